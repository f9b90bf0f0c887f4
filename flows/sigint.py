"""Ctrl-C that MindSpore cannot turn into SIGTERM.

MindSpore installs a process-wide SIGINT handler each time it runs a graph
(``GraphScheduler::Run`` -> ``RegisterGlobalSignalHandler(DefaultIntHandler)``,
mindspore/ccsrc/utils/signal_util.cc) that sends SIGTERM to its own process and is never
restored: from the first training step on, a Ctrl-C reached Python as SIGTERM and the run ended
with 143 and "stopped by SIGTERM" instead of 130 and "interrupted". A handler cannot tell the two
apart, and re-installing Python's handler loses to the next graph run.

:func:`forward_sigint`, called first thing in the process (before NumPy or MindSpore start any
thread), blocks SIGINT in the main thread, so that every thread started later blocks it too and no
handler ever runs for it; a daemon thread takes it with ``sigwait`` and wakes the main thread with
SIGUSR1, whose handler calls the Python handler currently set for SIGINT (flows/cli.py's, or
Python's default KeyboardInterrupt) in the main thread, interrupting a blocking call as a signal
does. Children inherit the blocked SIGINT: the temporary server and msrun run in sessions of their
own (a terminal's Ctrl-C does not reach them either way) and are stopped by the run with SIGTERM or
SIGKILL; MindSpore's dataset workers ignore SIGINT anyway. Stdlib only.
"""
from __future__ import annotations

import os
import signal
import threading

WAKE = signal.SIGUSR1


def _dispatch(signum: int, frame: object) -> None:
    """SIGUSR1 from the forwarder: act as the SIGINT handler set now would."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    elif handler == signal.SIG_DFL:  # die of SIGINT, as without forwarding
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.raise_signal(signal.SIGINT)


def _forward(main_thread: int) -> None:
    while True:
        signal.sigwait({signal.SIGINT})
        signal.pthread_kill(main_thread, WAKE)


def forward_sigint() -> bool:
    """Deliver SIGINT through a thread from now on (see the module's docstring). Only from a
    process's single thread and when SIGINT is not ignored (a background job or ``nohup`` keeps it
    ignored); returns whether forwarding is on."""
    if (threading.current_thread() is not threading.main_thread() or len(os.listdir("/proc/self/task")) != 1
            or signal.getsignal(signal.SIGINT) == signal.SIG_IGN):
        return False
    signal.signal(WAKE, _dispatch)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    threading.Thread(target=_forward, args=(threading.main_thread().ident,), name="sigint-forwarder",
                     daemon=True).start()
    return True
