"""Fixtures of the robustness tests; helpers are in robustness_support.py.

Homes of subprocess runs start from a copy of one migrated Prefect database: a fresh database
makes each run's temporary server ~10 s slower to start."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from robustness_support import VOLUMES, Pipeline, cli_env, new_home, stop_leftovers


@pytest.fixture(scope="session")
def isbi(isbi_dir: Path) -> dict[str, np.ndarray]:
    """The real stacks as uint8 arrays (read once): volume, labels, test."""
    return {"volume": tifffile.imread(isbi_dir / VOLUMES[0]), "labels": tifffile.imread(isbi_dir / VOLUMES[1]),
            "test": tifffile.imread(isbi_dir / VOLUMES[2])}


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty Prefect SQLite database to copy into each test's home."""
    home = tmp_path_factory.mktemp("prefect-template")
    prefect = Path(sys.executable).with_name("prefect")
    done = subprocess.run([str(prefect), "server", "database", "upgrade", "-y"], env=cli_env(home),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return home / "prefect.db"


@pytest.fixture
def pipeline(tmp_path: Path, migrated_db: Path):
    """A Pipeline with its own Prefect home; processes it leaves behind are stopped afterwards."""
    home = new_home(tmp_path / "prefect-home", migrated_db)
    yield Pipeline(home, tmp_path / "logs")
    stop_leftovers(home)


@pytest.fixture(scope="package")
def prefect_env(tmp_path_factory: pytest.TempPathFactory):
    """A temporary Prefect server, home and result storage for in-process runs of ``main``."""
    from prefect.settings import PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home-inprocess")
    with temporary_settings({PREFECT_HOME: str(home), PREFECT_LOCAL_STORAGE_PATH: str(home / "storage")}):
        with prefect_test_harness(server_startup_timeout=120):
            yield home
