"""Prefect tasks: one module and one ``@task`` per pipeline stage, each a thin wrapper that takes
paths and parameters, calls ``unet``, writes its stage folder and returns a small dict."""
