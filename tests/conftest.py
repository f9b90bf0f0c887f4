"""Shared fixtures. Real-data tests read the ISBI 2012 volumes from ``ISBI_DATA_DIR``
(CI sets it to ../shared/data/isbi2012); without it they look there relative to the repo."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ISBI_FILES = ("train-volume.tif", "train-labels.tif", "test-volume.tif")


def _isbi_dir() -> Path:
    env = os.environ.get("ISBI_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data" / "isbi2012"


@pytest.fixture(scope="session")
def isbi_dir() -> Path:
    """Folder holding the three real ISBI 2012 TIFF stacks (read-only; never copy into the repo)."""
    d = _isbi_dir()
    missing = [f for f in ISBI_FILES if not (d / f).is_file()]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"ISBI data missing in CI: {d} lacks {missing}")
        pytest.skip(f"ISBI data not found in {d} (set ISBI_DATA_DIR)")
    return d
