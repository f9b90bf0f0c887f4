"""Stop whatever a run started once the run's process is gone, SIGKILL included.

    python flows/watchdog.py RUN_PID TOKEN

:func:`watch_for_orphans` (called by flows/cli.py) puts ``UNET_RUN_TOKEN=TOKEN`` into the run's environment and
starts this script in a session of its own (a signal sent to the run's process group does not reach
it). Every process the run starts afterwards inherits the variable, whoever starts it and in whatever
session: Prefect's temporary server, msrun, its scheduler and ranks (each in a session of its own),
Dask's nanny and worker processes. The watchdog polls its parent; once the run is gone it sends
SIGTERM to every process whose environment holds the token, and SIGKILL to those still alive
``GRACE_SECONDS`` later. After a normal exit the run has already stopped them and nothing is left
to do.

Why this and not the alternatives: ``PR_SET_PDEATHSIG`` must be set inside each child between fork
and exec (the server, msrun and the Dask workers are started by Prefect, MindSpore and Dask, not
here), reaches direct children only (msrun's ranks are its grandchildren) and fires when the
*thread* that forked the child ends (Prefect runs tasks in worker threads). Prefect stops its
temporary server from an ``atexit`` hook, which a SIGKILL never runs. A process group or session is
escaped by msrun, which starts its ranks with ``setsid``. The environment is inherited across all of
these, and ``/proc/<pid>/environ`` shows it even after the process was re-parented to init.
Stdlib only: it starts in about 30 ms.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

TOKEN_VARIABLE = "UNET_RUN_TOKEN"
POLL_SECONDS = 0.2
GRACE_SECONDS = 5.0
_started: list[subprocess.Popen] = []


def watch_for_orphans() -> None:
    """Start this watchdog for the calling process, once: when the process is gone, even SIGKILLed,
    every process it starts after this call (they inherit ``UNET_RUN_TOKEN``) is stopped. The
    watchdog runs in a session of its own, so a signal to the caller's process group leaves it to
    see the end; its output goes nowhere (a caller's reader of this process's pipes is not held up)."""
    if _started:
        return
    token = f"{os.getpid()}-{secrets.token_hex(8)}"
    env = {k: v for k, v in os.environ.items() if k != TOKEN_VARIABLE}
    _started.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(os.getpid()), token],
                                     env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True))
    os.environ[TOKEN_VARIABLE] = token


def marked(token: str) -> list[int]:
    """Pids of the live processes (other than this one) whose environment holds ``token``."""
    needle = b"\0" + f"{TOKEN_VARIABLE}={token}".encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = b"\0" + (entry / "environ").read_bytes()
        except OSError:  # gone, or another user's
            continue
        if needle in environ:
            found.append(int(entry.name))
    return found


def _send(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def stop_marked(token: str, grace: float = GRACE_SECONDS) -> list[int]:
    """SIGTERM every process holding ``token``, SIGKILL those left after ``grace`` seconds; again
    for processes started meanwhile. Returns the pids found first."""
    first = marked(token)
    for _ in range(3):
        pids = marked(token)
        if not pids:
            break
        _send(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while (pids := marked(token)) and time.monotonic() < deadline:
            time.sleep(0.1)
        _send(pids, signal.SIGKILL)
        time.sleep(0.1)
    return first


def main(argv: list[str]) -> int:
    run_pid, token = int(argv[1]), argv[2]
    for signum in (signal.SIGINT, signal.SIGHUP):  # only the run's end stops the watchdog
        signal.signal(signum, signal.SIG_IGN)
    while os.getppid() == run_pid:
        time.sleep(POLL_SECONDS)
    stop_marked(token)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
