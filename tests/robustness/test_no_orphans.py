"""No orphans (issue 20, item 2): whatever a run starts dies with it, SIGKILL of its process included.

flows/watchdog.py, started by flows.watchdog.watch_for_orphans (flows/cli.py calls it), stops every process that inherited the
run's ``UNET_RUN_TOKEN`` once the run is gone: children in the run's process group, in sessions of
their own (as msrun's ranks and Prefect's temporary server are) and grandchildren re-parented to
init. The first tests check the mechanism on plain ``sleep`` processes (cheap); the others on the
pipeline: its temporary server after a SIGKILL, msrun's ranks after a SIGKILL in distributed
training."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kill_matrix_support import ENV
from robustness_support import REPO, SMOKE, error_lines, processes_using, small_data, wait_for, wait_gone

HERE = Path(__file__).resolve().parent
FAULT_RUNNER = HERE / "run_with_fault.py"

# A process that starts the watchdog, then three sleepers marked by a unique argument (TAG-sleeper): one in its own
# process group, one in a session of its own (as msrun starts its ranks), one whose parent exits at
# once (re-parented to init); it prints "ready" and waits to be killed, or exits with --exit.
PARENT = textwrap.dedent("""
    import os, subprocess, sys, time
    sys.path.insert(0, {repo!r})
    from flows.watchdog import watch_for_orphans
    watch_for_orphans()
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)", sys.argv[1] + "-sleeper"]
    subprocess.Popen(sleeper)
    subprocess.Popen(sleeper, start_new_session=True)
    subprocess.Popen([sys.executable, "-c", f"import subprocess; subprocess.Popen({{sleeper!r}})"]).wait()
    print("ready", flush=True)
    if "--exit" in sys.argv:
        sys.exit(0)
    time.sleep(600)
""")


def _with_argument(tag: str) -> list[int]:
    """Pids of the processes whose command line has ``tag``-sleeper as an argument."""
    tag, found = f"{tag}-sleeper", []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if tag.encode() in (entry / "cmdline").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _watchdogs_of(pid: int) -> list[int]:
    needle = f"{pid} ".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"flows/watchdog.py " + needle in cmd:
                found.append(int(entry.name))
    return found


def _gone(find, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := find()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture
def parent_script(tmp_path: Path) -> Path:
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(repo=str(REPO)))
    return script


def _start_parent(script: Path, tag: str, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(script), tag, *extra], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_sigkill_of_a_process_stops_everything_it_started(parent_script, tmp_path):
    tag = f"orphan-check-{tmp_path.name}"
    proc = _start_parent(parent_script, tag)
    try:
        assert len(_with_argument(tag)) == 3, "the three sleepers did not start"
        assert len(_watchdogs_of(proc.pid)) == 1
        os.killpg(proc.pid, signal.SIGKILL)  # the parent and the sleeper in its group
        proc.wait(10)
        assert _gone(lambda: _with_argument(tag), 15) == []
        assert _gone(lambda: _watchdogs_of(proc.pid), 5) == []
    finally:
        for pid in _with_argument(tag):
            os.kill(pid, signal.SIGKILL)


def test_sigkill_of_the_process_alone_stops_them_too(parent_script, tmp_path):
    tag = f"orphan-check-main-{tmp_path.name}"
    proc = _start_parent(parent_script, tag)
    try:
        proc.kill()  # the parent alone: all three sleepers are orphans now
        proc.wait(10)
        assert _gone(lambda: _with_argument(tag), 15) == []
    finally:
        for pid in _with_argument(tag):
            os.kill(pid, signal.SIGKILL)


def test_the_watchdog_leaves_with_its_process(parent_script, tmp_path):
    """After a normal exit the watchdog stops what is left (here: the sleepers) and ends."""
    tag = f"orphan-check-exit-{tmp_path.name}"
    proc = _start_parent(parent_script, tag, "--exit")
    try:
        assert proc.wait(10) == 0
        assert _gone(lambda: _with_argument(tag), 15) == []
        assert _gone(lambda: _watchdogs_of(proc.pid), 5) == []
    finally:
        for pid in _with_argument(tag):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def data(isbi, tmp_path_factory) -> Path:
    return small_data(tmp_path_factory.mktemp("data"), isbi, frames=15, test=12, side=256)


def _server_pids(home: Path) -> list[int]:
    return [pid for pid, cmd in processes_using(home).items() if "uvicorn" in cmd]


def _paused_before_extract(data, pipeline, tmp_path, name: str):
    """A smoke run in a session of its own, paused before its first stage, its server up."""
    marker = tmp_path / "paused"
    args = ["--data-dir", str(data), "--work-dir", str(tmp_path / "work"), *SMOKE]
    proc = pipeline.start(args, name, wrapper=[str(FAULT_RUNNER)], new_session=True,
                          env={**ENV, "FAULT": "pause-at", "PAUSE_POINT": "before:extract",
                               "PAUSE_MARKER": str(marker)})
    wait_for(marker.exists, proc, 300, "the flow to start")
    return proc


@pytest.mark.integration
def test_sigkill_of_the_run_stops_its_temporary_server(data, pipeline, tmp_path):
    """Before the watchdog, a SIGKILLed run always left its server (uvicorn) running for good."""
    proc = _paused_before_extract(data, pipeline, tmp_path, "killed")
    assert len(_server_pids(pipeline.home)) == 1, processes_using(pipeline.home)
    proc.kill()
    assert proc.wait(30) == -signal.SIGKILL
    assert wait_gone(pipeline.home, 30) == {}


@pytest.mark.integration
def test_ctrl_c_in_a_terminal_reaches_the_run_not_its_server(data, pipeline, tmp_path):
    """SIGINT to the run's process group (Ctrl-C): the server runs in a session of its own, so the run
    reports its end to a live server and stops it: exit 130, one line, nothing left."""
    proc = _paused_before_extract(data, pipeline, tmp_path, "ctrl-c")
    [server] = _server_pids(pipeline.home)
    assert os.getpgid(server) != proc.pid, "the server is in the run's process group"
    os.killpg(proc.pid, signal.SIGINT)
    code = proc.wait(120)
    err = pipeline.output(proc)[1]
    assert code == 130, err[-3000:]
    assert [line.split(";")[0] for line in error_lines(err)] == ["error: interrupted"], err[-3000:]
    assert "Traceback" not in err
    assert wait_gone(pipeline.home, 30) == {}


@pytest.mark.slow
@pytest.mark.integration
def test_sigkill_in_distributed_training_stops_msrun_and_its_ranks(data, pipeline, tmp_path):
    """msrun starts its ranks in sessions of their own: a SIGKILL of the run reaches none of them
    without the watchdog."""
    work = tmp_path / "work"
    args = ["--data-dir", str(data), "--work-dir", str(work), *SMOKE, "--epochs", "20", "--workers", "2"]
    proc = pipeline.start(args, "killed-msrun", new_session=True, env=ENV)

    def ranks() -> list[int]:
        return [pid for pid, cmd in processes_using(pipeline.home).items() if "unet.msrun_worker" in cmd]

    wait_for(lambda: len(ranks()) >= 2, proc, 600, "two msrun ranks", interval=0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the run's group: msrun and its ranks are in other sessions
    proc.wait(30)
    assert wait_gone(pipeline.home, 60) == {}
