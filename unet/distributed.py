"""Data-parallel training across processes and machines with ``msrun`` (MindSpore on CPU).

Two halves:

**Inside a rank** (:func:`init_data_parallel`, :class:`ProcessGroup`): ``mindspore.communication.init``
and ``set_auto_parallel_context(parallel_mode=DATA_PARALLEL, gradients_mean=True)``, after which
the training step (an ``nn.TrainOneStepCell``) averages the gradients of all ranks with an all-reduce. Every rank builds
the network after the same ``mindspore.set_seed``, so the weights start and stay identical;
:func:`unet.train.train` checks that at the start and at the end. The group also carries what
training needs besides the gradients, all made of MindSpore's CPU all-reduce (sum, float32 only):
averages (loss, BatchNorm running statistics), an exact gather of float64 rows (per-image
metrics; sent as 16-bit integer pieces, which a sum with zeros keeps exact) and a broadcast of
rank 0's parameters (others send zeros; for resuming from a checkpoint only rank 0 has to read).

**Launching** (:func:`launch`, :func:`join`): the job (recipe, image/mask pairs, output folder,
cluster shape) is written to ``<out_dir>/logs/job.json`` and ``msrun`` starts
``python -m unet.msrun_worker <job.json>`` once per local rank (and once more as its scheduler),
with ``--log_dir <out_dir>/logs``: every rank's log stays in the output folder
(``worker_<rank>.log``, ``scheduler.log``, and ``msrun.log`` for msrun's own output). A failed
rank fails the launch with a ``RuntimeError`` naming the rank and its last error line.
Multi-host: the host with ``node_rank`` 0 calls :func:`launch` with ``nodes > 1`` and a fixed
``master_port``; every other host runs ``python -m unet.distributed <job.json> --node-rank K``
(see docs/distributed.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

if TYPE_CHECKING:  # imported lazily: launching must not pay for (or initialise) MindSpore
    from unet.recipes import Recipe
    from unet.train import TrainResult

LOG_DIR = "logs"
JOB_FILE = "job.json"
MSRUN_EXIT = re.compile(r"Worker process (\d+) exit with exception\. Error code: (-?\d+)")
ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit|Failure))\b(:.*)?$")
_CHUNK = 1 << 24  # elements per all-reduce call


# --------------------------------------------------------------------------- inside a rank


class ProcessGroup:
    """The ranks training together. This base class is the single process (rank 0 of 1), where
    every collective is the identity; :class:`DataParallelGroup` is the msrun one."""

    rank: int = 0
    size: int = 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"

    def sum(self, x: np.ndarray) -> np.ndarray:
        """Element-wise float32 sum of ``x`` over the ranks."""
        return np.asarray(x, dtype=np.float32)

    def mean(self, value: float) -> float:
        """The mean of a scalar over the ranks."""
        return float(self.sum(np.array([value], np.float32))[0]) / self.size

    def gather(self, values: np.ndarray) -> np.ndarray:
        """Every rank's float64 ``values`` (same shape on each rank), exactly: shape ``[size, *shape]``."""
        values = np.ascontiguousarray(values, dtype="<f8")
        if self.size == 1:
            return values[None].copy()
        pieces = np.zeros((self.size, values.size * 4), np.float32)  # a float64 is four 16-bit pieces
        pieces[self.rank] = np.frombuffer(values.tobytes(), "<u2")
        summed = self.sum(pieces)  # every piece is an integer < 2**16 plus zeros: exact in float32
        return np.frombuffer(summed.astype("<u2").tobytes(), "<f8").reshape(self.size, *values.shape).copy()

    def broadcast_params(self, params: Iterable) -> None:
        """Give every rank rank 0's values of ``params`` (mindspore Parameters, float or int)."""
        if self.size == 1:
            return
        params, arrays, flat = _flatten(params)
        if self.rank != 0:
            flat[:] = 0.0
        self._set(params, arrays, self.sum(flat))

    def average_params(self, params: Iterable) -> None:
        """Replace float ``params`` by their mean over the ranks (BatchNorm running statistics)."""
        if self.size == 1:
            return
        params, arrays, flat = _flatten(params)
        self._set(params, arrays, self.sum(flat) / self.size)

    def check_same(self, digest: str, what: str) -> None:
        """RuntimeError unless every rank has the same ``digest`` (a hex string) of ``what``."""
        if self.size == 1:
            return
        mine = np.frombuffer(bytes.fromhex(digest[:32]).ljust(16, b"\0"), "<f8")  # any bytes: gather is exact
        every = self.gather(mine)
        differ = [r for r in range(self.size) if every[r].tobytes() != every[0].tobytes()]
        if differ:
            raise RuntimeError(f"{what} differ between rank 0 and rank(s) {differ} "
                               "(every rank must call mindspore.set_seed with the same seed)")

    @staticmethod
    def _set(params: list, arrays: list[np.ndarray], flat: np.ndarray) -> None:
        import mindspore as ms

        offset = 0
        for p, a in zip(params, arrays):
            value = flat[offset:offset + a.size].reshape(a.shape)
            offset += a.size
            if np.issubdtype(a.dtype, np.integer):
                value = np.rint(value)
            p.set_data(ms.Tensor(value.astype(a.dtype)))


SINGLE = ProcessGroup()


class DataParallelGroup(ProcessGroup):
    """The ranks of an msrun job, after :func:`init_data_parallel`."""

    def __init__(self, rank: int, size: int) -> None:
        import mindspore.ops as ops

        self.rank, self.size = rank, size
        self._all_reduce = ops.AllReduce()  # MindSpore's CPU all-reduce: sum, float32/16 only

    def sum(self, x: np.ndarray) -> np.ndarray:
        import mindspore as ms

        x = np.ascontiguousarray(x, dtype=np.float32)
        flat = x.ravel()
        out = np.empty_like(flat)
        for start in range(0, flat.size, _CHUNK):  # bounded message size, at most two kernel shapes
            part = flat[start:start + _CHUNK]
            out[start:start + part.size] = self._all_reduce(ms.Tensor(part)).asnumpy()
        return out.reshape(x.shape)


def init_data_parallel() -> DataParallelGroup:
    """Join the msrun job this process was started by; gradients are then averaged over its ranks.

    msrun also runs the worker script as the job's scheduler: for that process ``init()`` runs the
    scheduler and exits when the job ends, so call this before anything else."""
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    if "MS_ROLE" not in os.environ:
        raise RuntimeError("init_data_parallel() must run in a process started by msrun (MS_ROLE is not set)")
    ms.set_context(mode=ms.GRAPH_MODE)
    init()
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    return DataParallelGroup(get_rank(), get_group_size())


def params_digest(params: Iterable) -> str:
    """sha256 over the names, shapes, dtypes and values of mindspore Parameters (sorted by name)."""
    h = hashlib.sha256()
    for p in sorted(params, key=lambda q: q.name):
        a = np.ascontiguousarray(p.asnumpy())
        h.update(f"{p.name}:{a.shape}:{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def shard_steps(steps: int, size: int) -> int:
    """Optimizer steps per epoch on each of ``size`` ranks for an epoch of ``steps`` single-process
    batches: the epoch's samples are split between the ranks, rounded up so every frame is seen."""
    return math.ceil(steps / size)


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
    """``<out_dir>/logs/job.json``: everything a rank needs, with absolute paths."""
    log_dir = out_dir / LOG_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    job = {"recipe": recipe.to_dict(), "out_dir": str(out_dir.resolve()), "resume": resume,
           "train": [[str(Path(i).resolve()), str(Path(m).resolve())] for i, m in train_pairs],
           "val": [[str(Path(i).resolve()), str(Path(m).resolve())] for i, m in val_pairs],
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
    missing = {"recipe", "out_dir", "resume", "train", "val", "cluster"} - set(job)
    if missing:
        raise ValueError(f"{path}: job file lacks {sorted(missing)}")
    return job


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
    SIGKILL), then ``scheduler.log``."""
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


def run_msrun(job_path: Path, node_rank: int = 0, *, on_poll: Callable[[], None] | None = None,
              poll_seconds: float = 2.0, grace_seconds: float = 5.0) -> None:
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
    cmd = [sys.executable, "-m", "mindspore.parallel.cluster.run",
           f"--worker_num={cluster.workers}", f"--local_worker_num={cluster.local_workers}",
           f"--master_addr={cluster.master_addr}", f"--master_port={cluster.master_port}",
           f"--node_rank={node_rank}", f"--log_dir={log_dir}", "--join=True",
           f"--cluster_time_out={cluster.timeout}",
           f"--tail_worker_log={cluster.workers}",  # no such rank: do not copy worker logs to msrun.log
           "python", "-m", "unet.msrun_worker", str(Path(job_path).resolve())]
    with (log_dir / "msrun.log").open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_msrun_env(),
                                start_new_session=True)
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
    """A rank reported an exception, or msrun saw a worker exit abnormally."""
    if any(log_dir.glob("rank_*.error")):
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


def join(job_path: Path | str, node_rank: int) -> None:
    """Run node ``node_rank``'s ranks of a multi-host job started by :func:`launch` on node 0."""
    run_msrun(Path(job_path), node_rank)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m unet.distributed",
        description="Join a multi-host data-parallel training started on node 0: run this host's "
                    "ranks of the job (docs/distributed.md).")
    p.add_argument("job", help="the job file node 0 wrote: <train stage folder>/logs/job.json")
    p.add_argument("--node-rank", type=int, required=True, help="this host's index, 1..nodes-1")
    args = p.parse_args(argv)
    try:
        join(args.job, args.node_rank)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _flatten(params: Iterable) -> tuple[list, list[np.ndarray], np.ndarray]:
    """The parameters, their values, and those values as one float32 vector (for one collective)."""
    params = list(params)
    arrays = [p.asnumpy() for p in params]
    flat = np.concatenate([a.astype(np.float32).ravel() for a in arrays]) if arrays else np.zeros(0, np.float32)
    return params, arrays, flat
