"""Data-parallel training across processes and machines, launched with ``msrun`` (MindSpore on CPU).

What runs inside a rank (the process group, its collectives, joining the job) is
:mod:`unet.parallel`; its names are importable from here too. This module starts the ranks:

**One host** (:func:`launch`): the job (recipe, image/mask pairs, output folder, cluster shape) is
written to ``<out_dir>/logs/job.json`` and ``msrun`` starts ``python -m unet.msrun_worker <job.json>``
once per local rank (and once more as its scheduler), with ``--log_dir <out_dir>/logs``: every
rank's log stays in the output folder (``worker_<rank>.log``, ``scheduler.log``, and ``msrun.log``
for msrun's own output). A failed rank fails the launch with a ``RuntimeError`` naming the rank and
its last error line.

**Several hosts** (:func:`launch` with ``nodes > 1`` on node 0, :func:`join` on the others): node 0
runs the scheduler at a fixed ``master_port``; every other host runs ``python -m unet.distributed
<its copy of job.json> --node-rank K [--data-dir <its copy of the split stage folder>]``. The job
lists the frames relative to their folder, so each host may keep its copy anywhere. A host that
dies (its ranks stop sending heartbeats) fails node 0's launch, naming the lost rank, about
``MS_NODE_TIMEOUT`` (30 s) later. msrun and the processes it starts die with the process that
started them (:func:`die_with_parent`). See docs/distributed.md.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

# the in-rank half lives in unet.parallel (which unet.train imports); its names stay importable from here
from unet.parallel import (  # noqa: F401
    SINGLE, DataParallelGroup, ProcessGroup, init_data_parallel, params_digest, shard_steps)

if TYPE_CHECKING:  # imported lazily: launching must not pay for (or initialise) MindSpore
    from unet.recipes import Recipe
    from unet.train import TrainResult

LOG_DIR = "logs"
JOB_FILE = "job.json"
MSRUN_EXIT = re.compile(r"Worker process (\d+) exit with exception\. Error code: (-?\d+)")
# msrun's scheduler (on node 0) when a rank stops sending heartbeats: its host or process is gone
TIMED_OUT = re.compile(r"The node: (\d+) is timed out")
NODE_TIMEOUT = 30  # MindSpore's default of MS_NODE_TIMEOUT, seconds
ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit|Failure))\b(:.*)?$")


# --------------------------------------------------------------------------- launching


@dataclass(frozen=True)
class Cluster:
    """Shape of an msrun job: ``workers`` ranks in all, ``workers // nodes`` on each host."""

    workers: int
    nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: a free port of this host (single host only)
    timeout: int = 300  # seconds msrun waits for all ranks to join

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.nodes < 1 or self.workers % self.nodes:
            raise ValueError(f"workers ({self.workers}) must be a positive multiple of nodes ({self.nodes})")
        if self.nodes > 1 and not self.master_port:
            raise ValueError("a multi-host job needs a fixed master_port that every host can reach")
        if self.master_port and not 1024 <= self.master_port <= 65535:
            raise ValueError(f"master_port must be in 1024..65535, got {self.master_port}")

    @property
    def local_workers(self) -> int:
        return self.workers // self.nodes


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_job(recipe: "Recipe", train_pairs: Sequence, val_pairs: Sequence, out_dir: Path, cluster: Cluster,
              resume: bool) -> Path:
    """``<out_dir>/logs/job.json``: everything a rank needs. The image/mask paths are stored
    relative to ``data_dir``, the folder holding all of them (the split stage folder), so that a host
    with its own copy of that folder elsewhere joins with ``--data-dir`` (:func:`job_pairs`)."""
    log_dir = out_dir / LOG_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    files = [Path(f).resolve() for pair in (*train_pairs, *val_pairs) for f in pair]
    data_dir = Path(os.path.commonpath([f.parent for f in files])) if files else out_dir.resolve()

    def relative(pairs: Sequence) -> list[list[str]]:
        return [[Path(f).resolve().relative_to(data_dir).as_posix() for f in pair] for pair in pairs]

    job = {"recipe": recipe.to_dict(), "out_dir": str(out_dir.resolve()), "resume": resume,
           "data_dir": str(data_dir), "train": relative(train_pairs), "val": relative(val_pairs),
           "cluster": {"workers": cluster.workers, "nodes": cluster.nodes, "master_addr": cluster.master_addr,
                       "master_port": cluster.master_port, "timeout": cluster.timeout}}
    path = log_dir / JOB_FILE
    tmp = path.with_name("job.tmp.json")
    tmp.write_text(json.dumps(job, indent=1))
    os.replace(tmp, path)
    return path


def read_job(path: Path | str) -> dict[str, Any]:
    """The job written by :func:`write_job`; a clear error when it is missing or not a job."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: job file not found")
    try:
        job = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a JSON job file ({exc})") from None
    if not isinstance(job, dict):
        raise ValueError(f"{path}: not a job file (expected a JSON object)")
    missing = {"recipe", "out_dir", "resume", "data_dir", "train", "val", "cluster"} - set(job)
    if missing:
        raise ValueError(f"{path}: job file lacks {sorted(missing)}")
    return job


def job_pairs(job: dict[str, Any], subset: str, data_dir: Path | str | None = None) -> list[tuple[Path, Path]]:
    """The (image, mask) paths of ``subset`` ("train" or "val") of ``job``, under ``data_dir``
    (this host's copy of the job's data folder) or, by default, the folder node 0 used."""
    root = Path(data_dir if data_dir is not None else job["data_dir"])
    return [(root / image, root / mask) for image, mask in job[subset]]


def check_data(job: dict[str, Any], data_dir: Path | str | None = None) -> None:
    """FileNotFoundError naming the first image or mask of ``job`` missing under ``data_dir``."""
    for subset in ("train", "val"):
        for pair in job_pairs(job, subset, data_dir):
            for f in pair:
                if not f.is_file():
                    raise FileNotFoundError(f"{f}: a {subset} frame of the job is missing (every host needs "
                                            "its copy of the split stage folder, given as --data-dir)")


def rank_file(log_dir: Path, rank: int, kind: str) -> Path:
    """Per-rank files in the log folder: ``rank_<r>.json`` (weights digest after training),
    ``rank_<r>.error`` (the exception that ended the rank), ``rank_<r>.pid``."""
    return log_dir / f"rank_{rank}.{kind}"


def last_error_line(log: Path) -> str | None:
    """The last line of ``log`` that looks like a Python exception (``SomeError: message``)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if ERROR_LINE.match(line):
            return line.strip()
    return None


def rank_failure(log_dir: Path) -> tuple[int | None, str, Path] | None:
    """(rank, error line, log) of the rank that failed first, or None when no rank reports one.

    A rank that raised wrote ``rank_<r>.error`` (the earliest one is the cause: the others fail
    because it left); otherwise the tails of ``worker_<r>.log`` are searched, then the exit code
    msrun logged for a worker that died without a Python error (a signal: the OOM killer sends
    SIGKILL), then ``scheduler.log``. A rank the scheduler reports timed out (its host or process
    died: on another host msrun cannot see it exit) comes first unless it logged an error here: the
    ranks left behind fail because it is gone."""
    lost = _timed_out_rank(log_dir)
    if lost is not None and not rank_file(log_dir, lost, "error").is_file():
        return lost, (f"lost: no heartbeat from it for {_node_timeout()} s (its host, its msrun or the "
                      "rank itself died; on another host, see that host's logs)"), log_dir / "scheduler.log"
    errors = sorted(log_dir.glob("rank_*.error"), key=lambda p: p.stat().st_mtime)
    if errors:
        rank = int(errors[0].stem.split("_")[1])
        return rank, errors[0].read_text().strip(), _worker_log(log_dir, rank)
    logs = sorted(log_dir.glob("worker_*.log"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    for log in logs:
        line = last_error_line(log)
        if line:
            return int(re.sub(r"\D", "", log.stem)), line, log
    exit_code = _msrun_worker_exit(log_dir)
    if exit_code is not None:
        rank, code = exit_code
        what = (f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
                else "exited") + f" (exit code {code}) without a Python error"
        if code == -signal.SIGKILL:
            what += "; out of memory? see the kernel log (dmesg)"
        return rank, what, _worker_log(log_dir, rank) if rank is not None else log_dir / "msrun.log"
    sched = log_dir / "scheduler.log"
    line = last_error_line(sched)
    if line:
        return None, line, sched
    return None


def _timed_out_rank(log_dir: Path) -> int | None:
    """The first rank msrun's scheduler reported as timed out, if any (node ids are ranks here)."""
    try:
        found = TIMED_OUT.search((log_dir / "scheduler.log").read_text(errors="replace"))
    except OSError:
        return None
    return int(found.group(1)) if found else None


def _node_timeout() -> int:
    """Seconds without a heartbeat after which MindSpore's scheduler gives a rank up (MS_NODE_TIMEOUT)."""
    try:
        return int(os.environ.get("MS_NODE_TIMEOUT", NODE_TIMEOUT))
    except ValueError:
        return NODE_TIMEOUT


def _msrun_worker_exit(log_dir: Path) -> tuple[int | None, int] | None:
    """(rank, exit code) of the first worker msrun saw exit abnormally; the rank from the pid files."""
    try:
        found = MSRUN_EXIT.search((log_dir / "msrun.log").read_text(errors="replace"))
    except OSError:
        return None
    if not found:
        return None
    pid, code = int(found.group(1)), int(found.group(2))
    for pid_file in log_dir.glob("rank_*.pid"):
        try:
            if int(pid_file.read_text()) == pid:
                return int(pid_file.stem.split("_")[1]), code
        except (OSError, ValueError):
            continue
    return None, code


def _worker_log(log_dir: Path, rank: int) -> Path:
    return log_dir / f"worker_{rank}.log"


def _failure_message(log_dir: Path, returncode: int) -> str:
    failure = rank_failure(log_dir)
    if failure is None:
        return (f"distributed training failed (msrun exit code {returncode}) and no rank logged an error; "
                f"see {log_dir / 'msrun.log'}")
    rank, line, log = failure
    who = "the msrun scheduler" if rank is None else f"rank {rank}"
    return f"distributed training failed on {who}: {line} (log: {log})"


def _msrun_env() -> dict[str, str]:
    """msrun starts ``python`` from PATH: put this interpreter's folder first."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("GLOG_v", "3")  # msrun's own MindSpore import: errors only
    return env


PR_SET_PDEATHSIG = 1  # linux/prctl.h


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def die_with_parent(parent: int | None = None) -> None:
    """Have Linux SIGKILL this process when its parent exits (``prctl(PR_SET_PDEATHSIG)``), and
    exit at once if the parent is gone already (``parent``: its pid; default: any parent but init).
    For msrun (started by :func:`run_msrun`) and the processes msrun starts: a SIGKILL of the
    launching process (the pipeline, ``python -m unet.distributed``) must not leave them running.
    A no-op on systems other than Linux."""
    if not sys.platform.startswith("linux"):
        return
    if _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() == 1 or (parent is not None and os.getppid() != parent):
        os.kill(os.getpid(), signal.SIGKILL)


def run_msrun(job_path: Path, node_rank: int = 0, *, data_dir: Path | None = None,
              on_poll: Callable[[], None] | None = None, poll_seconds: float = 2.0, grace_seconds: float = 5.0) -> None:
    """Run this host's part of the job in ``job_path`` with msrun and wait for it; RuntimeError
    naming the failed rank and its last error line when any rank fails.

    When a rank fails, msrun stops the other ranks, but its scheduler only exits after a heartbeat
    timeout (about 30 s): ``grace_seconds`` after a rank's ``.error`` file or msrun's report of an
    abnormal exit, msrun and its scheduler are stopped here (they run in their own process group,
    started by this function)."""
    job = read_job(job_path)
    cluster = Cluster(**job["cluster"])
    if not 0 <= node_rank < cluster.nodes:
        raise ValueError(f"node_rank must be in 0..{cluster.nodes - 1}, got {node_rank}")
    log_dir = Path(job_path).parent
    log_dir.mkdir(parents=True, exist_ok=True)
    first = node_rank * cluster.local_workers
    mine = range(cluster.workers) if node_rank == 0 else range(first, first + cluster.local_workers)
    for r in mine:  # stale files of an earlier attempt (node 0 starts the job: all of them)
        for kind in ("json", "error", "pid"):
            rank_file(log_dir, r, kind).unlink(missing_ok=True)
        _worker_log(log_dir, r).unlink(missing_ok=True)
    if node_rank == 0:  # msrun writes it anew, but only seconds later: an old one must not be read as this run's
        (log_dir / "scheduler.log").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "mindspore.parallel.cluster.run",
           f"--worker_num={cluster.workers}", f"--local_worker_num={cluster.local_workers}",
           f"--master_addr={cluster.master_addr}", f"--master_port={cluster.master_port}",
           f"--node_rank={node_rank}", f"--log_dir={log_dir}", "--join=True",
           f"--cluster_time_out={cluster.timeout}",
           f"--tail_worker_log={cluster.workers}",  # no such rank: do not copy worker logs to msrun.log
           "python", "-m", "unet.msrun_worker", str(Path(job_path).resolve()), f"--node-rank={node_rank}"]
    if data_dir is not None:
        cmd += ["--data-dir", str(Path(data_dir).resolve())]
    _libc()  # loaded before the fork: the child only calls prctl
    with (log_dir / "msrun.log").open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_msrun_env(), start_new_session=True,
                                preexec_fn=functools.partial(die_with_parent, os.getpid()))
        failed_at = None
        try:
            while proc.poll() is None:
                time.sleep(poll_seconds)
                if on_poll is not None:
                    on_poll()
                if failed_at is None and _a_rank_failed(log_dir):
                    failed_at = time.monotonic()
                if failed_at is not None and time.monotonic() - failed_at > grace_seconds:
                    _stop(proc, log_dir)
        except BaseException:
            _stop(proc, log_dir)
            raise
    if on_poll is not None:
        on_poll()
    failure = None
    if proc.returncode != 0 or any(log_dir.glob("rank_*.error")):
        failure = _failure_message(log_dir, proc.returncode)  # reads the pid files: before removing them
    for r in mine:
        rank_file(log_dir, r, "pid").unlink(missing_ok=True)  # only needed to stop the ranks
    if failure is not None:
        raise RuntimeError(failure)


def _a_rank_failed(log_dir: Path) -> bool:
    """A rank reported an exception, msrun saw a worker exit abnormally, or the scheduler lost a rank."""
    if any(log_dir.glob("rank_*.error")) or _timed_out_rank(log_dir) is not None:
        return True
    try:
        return MSRUN_EXIT.search((log_dir / "msrun.log").read_text(errors="replace")) is not None
    except OSError:
        return False


def _stop(proc: subprocess.Popen, log_dir: Path) -> None:
    """Stop msrun (and its scheduler, in msrun's process group) and the ranks it started."""
    for pid_file in log_dir.glob("rank_*.pid"):
        try:
            pid = int(pid_file.read_text())
            os.killpg(os.getpgid(pid), signal.SIGKILL)  # msrun starts each rank in its own session
        except (OSError, ValueError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()


def launch(recipe: "Recipe", train_pairs: Sequence, val_pairs: Sequence, out_dir: Path | str, cluster: Cluster,
           *, resume: bool = True, on_epoch: Callable[[dict], None] | None = None,
           poll_seconds: float = 2.0) -> "TrainResult":
    """Train by ``recipe`` data-parallel on ``cluster.workers`` ranks started by msrun; this host is
    node 0 and runs ``cluster.local_workers`` of them. Writes what :func:`unet.train.train` writes
    (by rank 0 only) plus ``logs/``; ``on_epoch`` gets each new history row while the job runs."""
    import pandas as pd

    from unet.train import TrainResult

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not cluster.master_port:
        cluster = Cluster(cluster.workers, cluster.nodes, cluster.master_addr, free_port(), cluster.timeout)
    last_json = out_dir / "last.json"
    done_before = json.loads(last_json.read_text())["epoch"] if resume and last_json.is_file() else 0
    job_path = write_job(recipe, train_pairs, val_pairs, out_dir, cluster, resume)
    reported = [done_before]

    def report() -> None:
        history = out_dir / "history.csv"
        if on_epoch is None or not history.is_file():
            return
        try:
            rows = pd.read_csv(history).to_dict("records")
        except (OSError, ValueError, pd.errors.EmptyDataError):
            return
        for row in rows:
            if int(row["epoch"]) > reported[0]:
                reported[0] = int(row["epoch"])
                on_epoch(row)

    run_msrun(job_path, 0, on_poll=report, poll_seconds=poll_seconds)
    log_dir = job_path.parent
    digests, label_shift = {}, (0.0, 0.0)
    for r in range(cluster.workers):
        f = rank_file(log_dir, r, "json")
        if f.is_file():
            report = json.loads(f.read_text())
            digests[r] = report["weights_sha256"]
            if r == 0:
                label_shift = tuple(report.get("label_shift", label_shift))
    if 0 not in digests:
        raise RuntimeError(f"distributed training ended without rank 0's report {rank_file(log_dir, 0, 'json')}")
    differ = sorted(r for r, d in digests.items() if d != digests[0])
    if differ:
        raise RuntimeError(f"weights of rank(s) {differ} differ from rank 0's after training (see {log_dir})")
    state = json.loads(last_json.read_text())
    return TrainResult(out_dir / "best.ckpt", out_dir / "last.ckpt", out_dir / "history.csv",
                       int(state["best_epoch"]), float(state["best_val_iou"]), recipe.epochs - done_before,
                       digests[0], label_shift)


def join(job_path: Path | str, node_rank: int, data_dir: Path | str | None = None) -> None:
    """Run node ``node_rank``'s ranks of a multi-host job started by :func:`launch` on node 0.
    ``job_path``: this host's copy of node 0's job file (the ranks' logs go beside it);
    ``data_dir``: this host's copy of the job's data folder, if not at the path node 0 used."""
    job_path = Path(job_path)
    job = read_job(job_path)
    if node_rank < 1:
        raise ValueError(f"--node-rank must be in 1..{job['cluster']['nodes'] - 1} (node 0 is the launching host), "
                         f"got {node_rank}")
    check_data(job, data_dir)
    run_msrun(job_path, node_rank, data_dir=Path(data_dir) if data_dir is not None else None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m unet.distributed",
        description="Join a multi-host data-parallel training started on node 0: run this host's "
                    "ranks of the job (docs/distributed.md).")
    p.add_argument("job", help="this host's copy of the job file node 0 wrote (<train stage folder>/logs/job.json); "
                               "the ranks' logs go beside it")
    p.add_argument("--node-rank", type=int, required=True, help="this host's index, 1..nodes-1")
    p.add_argument("--data-dir", help="this host's copy of the split stage folder the job reads "
                                      "(default: the path it has on node 0)")
    args = p.parse_args(argv)
    try:
        join(args.job, args.node_rank, args.data_dir)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the ranks are stopped by run_msrun
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
