"""Shared fixtures. Real-data tests read the ISBI 2012 volumes from ``ISBI_DATA_DIR`` (CI sets it
to ../shared/data/isbi2012); without it from ``datasets/ISBI/`` in the repository when that holds
the three stacks (where ``make run`` reads them), else from ../shared/data/isbi2012 beside it.
Outside CI, tests that need the data are skipped without it, and the session ends with one line
saying how many and how to get the data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ISBI_FILES = ("train-volume.tif", "train-labels.tif", "test-volume.tif")
LOCAL_DATA = REPO / "datasets" / "ISBI"
SHARED_DATA = REPO.parent / "shared" / "data" / "isbi2012"
SKIP_REASON = "ISBI data not found"


def _has_stacks(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ISBI_FILES)


def _isbi_dir() -> Path:
    env = os.environ.get("ISBI_DATA_DIR")
    if env:
        return Path(env)
    return LOCAL_DATA if _has_stacks(LOCAL_DATA) else SHARED_DATA


@pytest.fixture(scope="session")
def isbi_dir() -> Path:
    """Folder holding the three real ISBI 2012 TIFF stacks (read-only; never copy into the repo)."""
    d = _isbi_dir()
    missing = [f for f in ISBI_FILES if not (d / f).is_file()]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"ISBI data missing in CI: {d} lacks {missing}")
        pytest.skip(f"{SKIP_REASON} in {d} (set ISBI_DATA_DIR)")
    return d


def _skipped_for_data(terminalreporter) -> int:
    count = 0
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        message = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        count += SKIP_REASON in message
    return count


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line at the end of a session that skipped tests for want of the ISBI stacks (after the
    short test summary: the outermost wrapper of the hook)."""
    yield
    skipped = _skipped_for_data(terminalreporter)
    if skipped:
        where = (f"ISBI_DATA_DIR={os.environ['ISBI_DATA_DIR']}" if os.environ.get("ISBI_DATA_DIR")
                 else f"{LOCAL_DATA.relative_to(REPO)}/ or {SHARED_DATA}")
        terminalreporter.write_line(
            f"{skipped} tests skipped: the ISBI 2012 stacks are not in {where}; put train-volume.tif, "
            f"train-labels.tif and test-volume.tif into datasets/ISBI/ (or set ISBI_DATA_DIR to their "
            f"folder) to run them", yellow=True, bold=True)
