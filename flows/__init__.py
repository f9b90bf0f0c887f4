"""Prefect flows: they order the stage tasks and declare parameters, nothing more."""
