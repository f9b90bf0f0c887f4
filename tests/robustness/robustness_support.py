"""Helpers of the robustness tests (fixtures are in conftest.py): input stacks built in temporary
folders from the real ISBI volumes, the pipeline as a subprocess bound to its own Prefect home,
finding the processes a test started, and reading what a run left in its work directory.

Every subprocess gets ``PREFECT_HOME`` and ``PREFECT_LOCAL_STORAGE_PATH`` in a temporary folder and
no ``PREFECT_API_URL``, so it starts its own temporary Prefect server, as a user's run does."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import pytest
import tifffile

REPO = Path(__file__).resolve().parents[2]
PIPELINE = REPO / "flows" / "full_pipeline.py"
SEGMENT = REPO / "flows" / "segment.py"
STAGES = ["extract", "split", "datasets", "train", "evaluate", "predict"]
VOLUMES = ("train-volume.tif", "train-labels.tif", "test-volume.tif")
SMOKE = ["--preset", "smoke"]


# --- input stacks -----------------------------------------------------------------------------

def write_tiff(path: Path, array: np.ndarray, **kwargs) -> Path:
    """A grey (or, for a last axis of 3, RGB) TIFF stack."""
    kwargs.setdefault("photometric", "rgb" if array.ndim == 4 else "minisblack")
    tifffile.imwrite(path, array, **kwargs)
    return path


def make_data(folder: Path, isbi_dir: Path, **files) -> Path:
    """A data folder: each of ``train_volume``, ``train_labels``, ``test_volume`` is an array
    (written as a TIFF), bytes (written as they are), ``None`` (left out) or not given (a link to
    the real file)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in VOLUMES:
        key = name[:-4].replace("-", "_")
        value = files.get(key, "real")
        target = folder / name
        if isinstance(value, str) and value == "real":
            target.symlink_to(isbi_dir / name)
        elif isinstance(value, np.ndarray):
            write_tiff(target, value)
        elif isinstance(value, bytes):
            target.write_bytes(value)
        elif value is not None:
            raise TypeError(f"{key}: {type(value)}")
    return folder


def small_data(folder: Path, isbi: dict, frames: int = 15, test: int = 30, side: int = 256) -> Path:
    """A cut of the real stacks (``frames`` labelled, ``test`` test frames, central ``side``
    square): the same kind of data, faster to evaluate and predict."""
    lo = (512 - side) // 2
    cut = np.s_[lo:lo + side, lo:lo + side]
    folder.mkdir(parents=True, exist_ok=True)
    write_tiff(folder / VOLUMES[0], np.ascontiguousarray(isbi["volume"][:frames][(slice(None), *cut)]))
    write_tiff(folder / VOLUMES[1], np.ascontiguousarray(isbi["labels"][:frames][(slice(None), *cut)]))
    write_tiff(folder / VOLUMES[2], np.ascontiguousarray(isbi["test"][:test][(slice(None), *cut)]))
    return folder


# --- Prefect homes and the pipeline as a subprocess -------------------------------------------

def new_home(folder: Path, migrated_db: Path | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if migrated_db is not None:
        shutil.copy2(migrated_db, folder / "prefect.db")
    return folder


def cli_env(home: Path) -> dict[str, str]:
    """The environment of a pipeline subprocess: its own Prefect home and result storage."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_LOCAL_STORAGE_PATH=str(home / "storage"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def processes_using(home: Path) -> dict[int, str]:
    """pid -> command line of every process whose environment has ``PREFECT_HOME=home``: the
    pipeline runs of one test and the temporary Prefect servers they started, nothing else."""
    found = {}
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get("PREFECT_HOME") == str(home):
                found[proc.pid] = " ".join(proc.cmdline())[:200]
        except psutil.Error:
            continue
    return found


def wait_gone(home: Path, seconds: float = 15.0) -> dict[int, str]:
    """Processes still using ``home`` after up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while (left := processes_using(home)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def stop_leftovers(home: Path) -> dict[int, str]:
    """SIGTERM, then SIGKILL, the processes a test started with ``home`` that are still running
    (a server orphaned by a SIGKILLed run); returns what was found."""
    left = processes_using(home)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in wait_gone(home, 10.0):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def _default_signals() -> None:
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


class Pipeline:
    """``python flows/full_pipeline.py`` (or another command line: ``script``, e.g. :data:`SEGMENT`)
    as a subprocess bound to one Prefect home."""

    def __init__(self, home: Path, logs: Path, script: Path = PIPELINE) -> None:
        self.home = home
        self.logs = logs
        self.script = script
        self.count = 0

    def command(self, args: list[str], wrapper: list[str] | None = None) -> list[str]:
        return [sys.executable, *(wrapper or []), str(self.script), *args]

    def run(self, args: list[str], timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(args), env={**cli_env(self.home), **(env or {})}, cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)

    def start(self, args: list[str], name: str, wrapper: list[str] | None = None,
              env: dict[str, str] | None = None, new_session: bool = False) -> subprocess.Popen:
        """Start a run with stdout/stderr in ``logs/<name>.out|err`` (read them with ``.output``).
        The run gets the default handling of SIGINT and SIGHUP even where this process ignores them
        (a background job of a non-interactive shell ignores SIGINT, a job under ``nohup`` SIGHUP;
        children inherit an ignored signal, and the pipeline keeps an ignored signal ignored).
        ``new_session``: the run leads a process group of its own, which ``os.killpg(proc.pid, sig)``
        signals as a terminal's Ctrl-C or a supervisor would (the run's pid is the group's id)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        out, err = (open(self.logs / f"{name}.{s}", "w") for s in ("out", "err"))
        proc = subprocess.Popen(self.command(args, wrapper), env={**cli_env(self.home), **(env or {})}, cwd=REPO,
                                stdout=out, stderr=err,
                                preexec_fn=_default_signals, start_new_session=new_session)
        proc.name = name  # type: ignore[attr-defined]
        out.close()
        err.close()
        return proc

    def output(self, proc: subprocess.Popen) -> tuple[str, str]:
        name = proc.name  # type: ignore[attr-defined]
        return ((self.logs / f"{name}.out").read_text(), (self.logs / f"{name}.err").read_text())


def wait_for(condition: Callable[[], object], proc: subprocess.Popen | None, timeout: float, what: str,
             interval: float = 0.02) -> object:
    """Poll ``condition`` until it is truthy; fail if ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run exited (code {proc.returncode}) before {what}")
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def summary_of(work: Path) -> dict:
    return json.loads((work / "runs" / "latest" / "summary.json").read_text())


def states(summary: dict) -> dict[str, str]:
    return {name: summary["stages"][name]["state"] for name in STAGES}


def only(*ran: str) -> dict[str, str]:
    return {name: ("Completed" if name in ran else "Cached") for name in STAGES}


def finished(work: Path, stage: str) -> list[Path]:
    """Finished folders of ``stage``: named by a key alone and holding a manifest."""
    root = work / stage
    return sorted(p for p in root.iterdir() if "." not in p.name and (p / "manifest.json").is_file()) \
        if root.is_dir() else []


# --- in-process runs --------------------------------------------------------------------------


