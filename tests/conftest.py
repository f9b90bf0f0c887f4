"""Shared fixtures. Real-data tests read the ISBI 2012 volumes from ``ISBI_DATA_DIR`` (CI sets it
to ../shared/data/isbi2012); without it from ``datasets/ISBI/`` in the repository when that holds
the three stacks (where ``make run`` reads them), else from ../shared/data/isbi2012 beside it.
Outside CI, tests that need the data are skipped without it, and the session ends with one line
saying how many and how to get the data."""
from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
ISBI_FILES = ("train-volume.tif", "train-labels.tif", "test-volume.tif")
LOCAL_DATA = REPO / "datasets" / "ISBI"
SHARED_DATA = REPO.parent / "shared" / "data" / "isbi2012"
SKIP_REASON = "ISBI data not found"
# What the session started (for the check at its end that nothing it started is still running).
SESSION = {"start": time.time(), "tmp": None}
LEFTOVER_GRACE_SECONDS = 20  # a run's watchdog stops what is left within ~6 s of the run's end


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


@pytest.fixture(scope="session", autouse=True)
def _session_tmp(tmp_path_factory) -> None:
    SESSION["tmp"] = str(tmp_path_factory.getbasetemp())


def _started_here(proc: psutil.Process, me: int) -> bool:
    """A process this session started: a descendant of pytest; or, started after the session
    began, one whose command line names the session's temporary folder, or a Prefect server
    (uvicorn, ``prefect server``) or run watchdog whose environment names it (a server of another
    session on this machine is not ours). psutil comes with distributed (pinned)."""
    try:
        if proc.pid == me or proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = " ".join(proc.cmdline())
        if "multiprocessing.resource_tracker" in cmdline or "multiprocessing.forkserver" in cmdline:
            return False  # multiprocessing's helpers of this process: they end with it
        if f"flows/watchdog.py {me} " in cmdline:
            return False  # the watchdog of an in-process run (flows/temporary_server.py start_temporary_server): ends with pytest
        if any(parent.pid == me for parent in proc.parents()):
            return True
        if proc.create_time() < SESSION["start"] or not SESSION["tmp"]:
            return False
        if SESSION["tmp"] in cmdline:
            return True
        if "uvicorn" in cmdline or "prefect server" in cmdline or "flows/watchdog.py" in cmdline:
            return any(SESSION["tmp"] in value for value in proc.environ().values())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return False


def _leftovers() -> dict[int, str]:
    me = os.getpid()
    found = {}
    for proc in psutil.process_iter():
        if _started_here(proc, me):
            try:
                found[proc.pid] = " ".join(proc.cmdline())[:200]
            except psutil.Error:
                continue
    return found


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """Fail the session when a process it started is still running (a server, a worker, an msrun
    rank, a pipeline run) LEFTOVER_GRACE_SECONDS after the last test; list and stop them."""
    deadline = time.monotonic() + LEFTOVER_GRACE_SECONDS
    while (left := _leftovers()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not left:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"{len(left)} processes started by the tests are still running (now stopped):"]
    lines += [f"  {pid}: {cmd}" for pid, cmd in sorted(left.items())]
    if reporter is not None:
        reporter.ensure_newline()
        for line in lines:
            reporter.write_line(line, red=True, bold=True)
    for pid in left:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
