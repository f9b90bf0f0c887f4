"""Training on two hosts, proven on one: node 0 and node 1 as two separate launches that share
nothing but loopback (127.0.0.1) and the two copies docs/distributed.md names (the job file and
the split stage folder), each in its own folder. The commands are read from the "two-node
commands" block of docs/distributed.md and run line by line, so the docs show what ran here.

Every process a test starts carries ``UNET_TEST_TAG`` in its environment (msrun and the ranks
inherit it); each test ends by checking that none is left, and a teardown kills any that are."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "distributed.md"
BLOCK = re.compile(r"<!-- two-node commands: begin -->\s*```sh\n(.*?)```\s*<!-- two-node commands: end -->", re.S)
DEATH_BOUND = 90  # seconds from node 1's death to node 0's exit: MS_NODE_TIMEOUT (30 s) + grace + flow shutdown
TIMING_COLUMNS = ["train_seconds", "eval_seconds", "seconds"]


def doc_commands() -> list[str]:
    """The block's commands: node 0's pipeline, node 1's copies, node 1's launch (last)."""
    found = BLOCK.search(DOC.read_text())
    assert found, f"{DOC}: no two-node commands block"
    commands = [line for line in found.group(1).splitlines() if line.strip() and not line.startswith("#")]
    assert "flows/full_pipeline.py" in commands[0] and "python -m unet.distributed" in commands[-1], commands
    return commands


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Hosts:
    """Two "hosts" on loopback: folders ``node0`` and ``node1``, one Prefect home for node 0's runs
    (so that reruns reuse its finished stages, as on a real host A), and the tagged environment."""

    def __init__(self, root: Path, data: Path) -> None:
        self.root, self.data = root, data
        self.node0, self.node1, self.logs = root / "node0", root / "node1", root / "logs"
        for d in (self.node0, self.node1, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        self.tag = uuid.uuid4().hex
        self.count = 0

    def env(self, port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "UNET_MSRUN_"))}
        home = self.root / "prefect-home"
        env.update(PREFECT_HOME=str(home), PREFECT_LOCAL_STORAGE_PATH=str(home / "storage"),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="600",  # a loaded machine: 129 s seen
                   PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
                   DATA=str(self.data), NODE0=str(self.node0), NODE1=str(self.node1), PORT=str(port),
                   UNET_TEST_TAG=self.tag)
        return env

    def start(self, command: str, name: str, port: int) -> subprocess.Popen:
        """``command`` in its own process group (a "host": SIGKILL of the group is the host dying)."""
        self.count += 1
        out = open(self.logs / f"{self.count:02d}-{name}.out", "w")
        err = open(self.logs / f"{self.count:02d}-{name}.err", "w")
        proc = subprocess.Popen(["bash", "-c", command], env=self.env(port), cwd=REPO, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        proc.out, proc.err = Path(out.name), Path(err.name)  # type: ignore[attr-defined]
        out.close()
        err.close()
        return proc

    def run(self, command: str, port: int) -> None:
        done = subprocess.run(["bash", "-c", command], env=self.env(port), cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"

    def processes(self) -> dict[int, str]:
        """pid -> command line of every live process with this module's tag (msrun, ranks, servers)."""
        found = {}
        for proc in psutil.process_iter():
            try:
                if proc.pid != os.getpid() and proc.environ().get("UNET_TEST_TAG") == self.tag:
                    found[proc.pid] = " ".join(proc.cmdline())[:160]
            except psutil.Error:
                continue
        return found

    def assert_none_left(self, seconds: float = 15.0) -> None:
        deadline = time.monotonic() + seconds
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"processes outlived the test: {left}"

    def kill_all(self) -> None:
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def tagged(hosts: Hosts):
    """Processes this process starts meanwhile (a library launch) carry the tag too."""
    os.environ["UNET_TEST_TAG"] = hosts.tag
    try:
        yield
    finally:
        os.environ.pop("UNET_TEST_TAG", None)


def wait_for(condition, proc: subprocess.Popen, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"node 0 exited (code {proc.returncode}) before {what}:\n{tail(proc)}")
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def tail(proc: subprocess.Popen, lines: int = 30) -> str:
    return "\n".join((proc.out.read_text() + proc.err.read_text()).splitlines()[-lines:])  # type: ignore[attr-defined]


def job_file(hosts: Hosts, port: int) -> Path | None:
    """Node 0's job file of the launch on ``port`` (a rerun's partial folder holds the old one first)."""
    for path in hosts.node0.glob("train/*.partial/logs/job.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            if json.loads(path.read_text())["cluster"]["master_port"] == port:
                return path
    return None


def start_two_nodes(hosts: Hosts) -> tuple[subprocess.Popen, subprocess.Popen, Path]:
    """Run the docs' block: node 0, then (once its job file exists) node 1's copies and launch."""
    commands, port = doc_commands(), free_port()
    node0 = hosts.start(commands[0], "node0", port)
    job = wait_for(lambda: job_file(hosts, port), node0, 300, "node 0's job file")
    for command in commands[1:-1]:
        hosts.run(command, port)
    node1 = hosts.start(commands[-1], "node1", port)
    return node0, node1, job.parents[1]


def wait_both(node0: subprocess.Popen, node1: subprocess.Popen) -> None:
    for name, proc in (("node 0", node0), ("node 1", node1)):
        try:
            proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not finish in 600 s:\n{tail(proc)}")
        assert proc.returncode == 0, f"{name} failed:\n{tail(proc)}"


def epochs_of(command: str) -> int:
    return int(re.search(r"--epochs (\d+)", command).group(1))


def checkpoint(path: Path) -> dict[str, np.ndarray]:
    import unet  # noqa: F401  (the oneDNN cap before mindspore loads)
    import mindspore as ms

    return {name: value.asnumpy() for name, value in ms.load_checkpoint(str(path)).items()}


def assert_same_checkpoints(folder: Path, reference: Path) -> None:
    """Every tensor of best.ckpt and last.ckpt (weights, optimizer state, training state) bit for bit."""
    for name in ("best.ckpt", "last.ckpt"):
        mine, ref = checkpoint(folder / name), checkpoint(reference / name)
        assert sorted(mine) == sorted(ref), name
        differ = [k for k in ref if mine[k].dtype != ref[k].dtype or mine[k].tobytes() != ref[k].tobytes()]
        worst = max((float(np.max(np.abs(mine[k].astype(np.float64) - ref[k].astype(np.float64)))) for k in differ),
                    default=0.0)
        print(f"{name}: {len(ref)} tensors, {len(differ)} differ, max |diff| {worst}; "
              f"file bytes equal: {(folder / name).read_bytes() == (reference / name).read_bytes()}")
        assert not differ, f"{name}: {len(differ)} tensors differ from the one-host run, e.g. {differ[:3]}"
    history = pd.read_csv(folder / "history.csv").drop(columns=TIMING_COLUMNS)
    pd.testing.assert_frame_equal(history, pd.read_csv(reference / "history.csv").drop(columns=TIMING_COLUMNS),
                                  check_exact=True)


@pytest.fixture(scope="module")
def hosts(isbi_dir, tmp_path_factory):
    hosts = Hosts(tmp_path_factory.mktemp("two-node"), isbi_dir)
    yield hosts
    hosts.kill_all()


@pytest.fixture
def cleanup(hosts):
    """Whatever a test leaves running is killed when it ends (the test itself asserts there is none)."""
    yield
    hosts.kill_all()


@pytest.fixture(scope="module")
def first_run(hosts):
    """The docs' commands once (node 0 and node 1, one rank each), then the same job on one host with
    ``--workers 2`` (unet.distributed.launch, what the training stage calls) for comparison."""
    from unet.distributed import Cluster, job_pairs, launch, read_job
    from unet.recipes import Recipe

    t0 = time.monotonic()
    node0, node1, stage = start_two_nodes(hosts)
    wait_both(node0, node1)
    seconds = time.monotonic() - t0
    final = stage.with_name(stage.name.removesuffix(".partial"))
    job = read_job(final / "logs" / "job.json")
    reference = hosts.root / "one-host"
    t0 = time.monotonic()
    with tagged(hosts):
        launch(Recipe.from_dict(job["recipe"]), job_pairs(job, "train"), job_pairs(job, "val"), reference,
               Cluster(2), resume=False)
    print(f"two nodes: the whole pipeline {seconds:.1f} s; one host, --workers 2: training {time.monotonic() - t0:.1f} s")
    return {"node0": node0, "node1": node1, "stage": final, "job": job, "reference": reference}


def test_two_node_training_matches_one_host(hosts, first_run, cleanup):
    stage, job, epochs = first_run["stage"], first_run["job"], epochs_of(doc_commands()[0])
    assert (stage / "manifest.json").is_file()  # the stage finished on node 0
    cluster = job["cluster"]
    assert (cluster["workers"], cluster["nodes"], cluster["master_addr"]) == (2, 2, "127.0.0.1")
    assert Path(job["data_dir"]).is_relative_to(hosts.node0)  # node 0 read its own frames ...
    node1_logs = hosts.node1 / "logs"
    assert (hosts.node1 / "split" / job["train"][0][0]).is_file()  # ... and node 1 its copy
    # each host has its own ranks' logs only: nothing was shared but the network and the two copies
    assert (stage / "logs" / "worker_0.log").is_file() and not (stage / "logs" / "worker_1.log").exists()
    assert (node1_logs / "worker_1.log").is_file() and not (node1_logs / "worker_0.log").exists()
    for log in (stage / "logs" / "worker_0.log", node1_logs / "worker_1.log"):
        assert f"epoch {epochs}/{epochs}" in log.read_text(), log  # both ranks trained every epoch
    assert "scheduler runs on node 0" in (node1_logs / "scheduler.log").read_text()  # one scheduler, node 0's
    rank0 = json.loads((stage / "logs" / "rank_0.json").read_text())
    rank1 = json.loads((node1_logs / "rank_1.json").read_text())
    assert (rank0["size"], rank1["size"]) == (2, 2)
    assert rank0["weights_sha256"] == rank1["weights_sha256"]
    assert len(pd.read_csv(stage / "history.csv")) == epochs
    assert_same_checkpoints(stage, first_run["reference"])
    hosts.assert_none_left()


def test_node_death_fails_bounded_and_resumes(hosts, first_run, cleanup):
    import shutil

    shutil.rmtree(first_run["stage"])  # train again, from scratch, with the same commands
    shutil.rmtree(hosts.node1 / "logs")
    epochs = epochs_of(doc_commands()[0])
    node0, node1, partial = start_two_nodes(hosts)
    last = partial / "last.json"

    def finished_epoch() -> int:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(last.read_text())["epoch"]
        return 0

    wait_for(lambda: finished_epoch() >= 1, node0, 300, "epoch 1 on node 0")
    os.killpg(node1.pid, signal.SIGKILL)  # host B goes down: its launch, msrun and rank
    killed = time.monotonic()
    killed_after = finished_epoch()
    try:
        node0.wait(timeout=DEATH_BOUND + 60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"node 0 still running {DEATH_BOUND + 60} s after node 1 died:\n{tail(node0)}")
    took = time.monotonic() - killed
    print(f"node 1 killed after epoch {killed_after}; node 0 exited {took:.1f} s later with code {node0.returncode}")
    assert node0.returncode == 1, tail(node0)
    errors = [line for line in node0.err.read_text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "failed on rank 1: lost" in errors[0], tail(node0)
    assert took < DEATH_BOUND, f"node 0 took {took:.1f} s to notice"
    # nothing marked done: only the partial folder, with the last finished epoch to resume from
    assert not (partial.with_name(partial.name.removesuffix(".partial"))).exists()
    assert not (partial / "manifest.json").exists()
    stopped_at = finished_epoch()
    assert 1 <= stopped_at < epochs
    hosts.assert_none_left()  # node 1's msrun and rank died with its launch; node 0's too

    node0, node1, again = start_two_nodes(hosts)
    wait_both(node0, node1)
    assert again == partial
    final = partial.with_name(partial.name.removesuffix(".partial"))
    assert (final / "manifest.json").is_file()
    assert f"after epoch {stopped_at}" in (final / "logs" / "worker_0.log").read_text()  # resumed, not restarted
    assert_same_checkpoints(final, first_run["reference"])  # as if never interrupted
    hosts.assert_none_left()
