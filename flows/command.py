"""What the project's command lines share (``python flows/full_pipeline.py``, ``flows/segment.py``,
``flows/export.py``): exit codes, one-line errors, argument types, and SIGINT/SIGTERM/SIGHUP handling
that never leaves the run's temporary Prefect server (flows/temporary_server.py) behind.
Imports no flow: a command line that only segments does not load the training pipeline."""
from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import os
import signal
import sys
import threading
from typing import Callable, Iterator, NoReturn

# Exit codes of the command line (README: "What to expect").
EXIT_FAILED = 1        # bad input data, unwritable work directory, disk full, any failed stage
EXIT_USAGE = 2         # invalid command-line arguments or recipe values
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_TERMINATED = 143   # SIGTERM / SIGHUP
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def exit_code(signum: int) -> int:
    """The exit code after ``signum``: 130 for Ctrl-C (SIGINT), 143 for SIGTERM and SIGHUP."""
    return EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_TERMINATED


def stopped_by(signum: int) -> str:
    """How the console says it: ``interrupted`` (Ctrl-C), ``stopped by SIGTERM``, ..."""
    return "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM/SIGHUP. A BaseException, like KeyboardInterrupt:
    Prefect records the run as Crashed, ``finally`` blocks run and the interpreter exits normally, so
    the temporary Prefect server this process started (stopped by an ``atexit`` hook) does not
    outlive it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:  # Prefect's Crashed state: "... unexpected exception: Terminated: SIGINT"
        return signal.Signals(self.signum).name


def describe(exc: BaseException) -> str:
    """One line for the console: the message (``path: what``), the type only for unexpected errors."""
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
        if exc.filename2:
            text += f" -> {exc.filename2}"
    else:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        text = lines[0] if lines else ""
        if not isinstance(exc, (ValueError, OSError)):
            text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
            text += " (run with --debug for the traceback)"
    return text if len(text) <= 600 else text[:597] + "..."


class _NoTracebackFormatter(logging.Formatter):
    """Formats like ``inner`` without the exception's traceback (on a copy of the record, so that
    Prefect's API handler still sends the traceback to the UI)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            record = copy.copy(record)
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return self.inner.format(record)


@contextlib.contextmanager
def _console_without_tracebacks() -> Iterator[None]:
    """Prefect logs a failed task's traceback (twice) on the console; without --debug, only the
    log lines and the final ``error:`` line are printed."""
    handlers = {h for name in ("", "prefect", "uvicorn", "fastapi", "unet")
                for h in logging.getLogger(name).handlers if isinstance(h, logging.StreamHandler)}
    saved = {h: h.formatter for h in handlers}
    for h in handlers:
        h.setFormatter(_NoTracebackFormatter(h.formatter))
    try:
        yield
    finally:
        for h, formatter in saved.items():
            h.setFormatter(formatter)


@contextlib.contextmanager
def _signals_exit() -> Iterator[None]:
    """Before the flow starts nothing needs cleaning up: SIGINT/SIGTERM/SIGHUP end the process at
    once, with one line and the exit code of :func:`exit_code` (an exception could land inside an
    import and break the module for good)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_now(signum: int, frame: object) -> None:
        sys.stderr.write(f"error: {stopped_by(signum)} before the pipeline started\n")
        sys.stderr.flush()
        os._exit(exit_code(signum))

    previous = {signum: signal.signal(signum, exit_now) for signum in STOP_SIGNALS
                if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


class _Signals:
    """What :func:`_signals_raise` saw: ``received``, the termination signals (SIGTERM, SIGHUP);
    ``first``, the first stop signal, SIGINT included, which decides the exit code and the line."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.first: int | None = None

    def settled(self) -> None:
        """Stop re-raising: main() has the exception."""
        signal.setitimer(signal.ITIMER_REAL, 0)

    def exit_code(self) -> int:
        """130 for Ctrl-C (SIGINT) or a KeyboardInterrupt raised without a signal, else 143."""
        return exit_code(self.first) if self.first is not None else EXIT_INTERRUPTED

    def stopped_by(self) -> str:
        return stopped_by(self.first) if self.first is not None else "interrupted"


RERAISE_SECONDS = 2.0
IMPORT_POLL_SECONDS = 0.2


def _importing_mindspore() -> bool:
    """Whether MindSpore (or one of its modules) is being imported right now: an exception raised
    inside its import leaves a half-initialised module whose exit hook aborts the interpreter
    (SIGABRT and a C-level traceback at exit), so a stop signal waits for the import to end."""
    return any(getattr(getattr(module, "__spec__", None), "_initializing", False)
               for name, module in list(sys.modules.items()) if name.partition(".")[0] == "mindspore")


def _stop_exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


@contextlib.contextmanager
def _signals_raise() -> Iterator[_Signals]:
    """SIGTERM and SIGHUP raise :class:`Terminated`, SIGINT ``KeyboardInterrupt``, in the main thread
    while the pipeline runs.

    Python's default action kills the process at once: no ``atexit`` hook runs, and the temporary
    Prefect server (a uvicorn child process) is left running. Prefect replaces the SIGTERM handler
    while a flow runs, marks the run Crashed, then re-sends the signal to the handler it found —
    this one. Python drops an exception raised inside a weakref callback (the import system uses
    them) and library code may wrap it in another (pydantic does, in a serializer): the exception
    is raised again every 2 s until ``main`` has it, and ``first`` tells ``main`` what really
    happened. MindSpore turns a SIGINT into a SIGTERM once it has run a graph,
    unless the process forwards SIGINT (flows/sigint.py, as ``python flows/full_pipeline.py`` does).
    A signal that lands while MindSpore is being imported is raised when that import ends
    (:func:`_importing_mindspore`). A signal that is ignored (``nohup``) stays ignored."""
    signals = _Signals()
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return

    def raise_again(signum: int, frame: object) -> None:
        if _importing_mindspore():
            return  # the timer comes back
        signal.setitimer(signal.ITIMER_REAL, RERAISE_SECONDS, RERAISE_SECONDS)
        raise _stop_exception(signals.first)

    def raise_terminated(signum: int, frame: object) -> None:
        if signals.first is None:
            signals.first = signum
        if signum != signal.SIGINT:
            signals.received.append(signum)
        signal.signal(signal.SIGALRM, raise_again)
        if _importing_mindspore():  # raised once the import is done (within IMPORT_POLL_SECONDS)
            signal.setitimer(signal.ITIMER_REAL, IMPORT_POLL_SECONDS, IMPORT_POLL_SECONDS)
            return
        signal.setitimer(signal.ITIMER_REAL, RERAISE_SECONDS, RERAISE_SECONDS)
        raise _stop_exception(signum)

    previous: dict[int, Callable | int | None] = {signal.SIGALRM: signal.getsignal(signal.SIGALRM)}
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, raise_terminated)
    try:
        yield signals
    finally:
        signals.settled()
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def prefect_defaults() -> None:
    """The environment every entry point sets before Prefect is imported (a user's own values win):
    no telemetry (offline machines), 120 s for the temporary server's start (a first start migrates
    a new database), and the ``unet`` library's log lines in the run's logs."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "unet")


def run_command(debug: bool, check: Callable[[], object], run: Callable[[], object], kept: str) -> tuple[int, object]:
    """The shape every command line shares: ``check()`` (arguments, inputs, output folder) while a
    stop signal ends the process at once (nothing has started), then ``run()`` (which starts the
    temporary server and the flow) while a stop signal raises and unwinds (:func:`_signals_raise`).
    Every error is one ``error: ...`` line (a traceback only with ``debug``); a stop prints ``error:
    interrupted; <kept>`` or ``error: stopped by SIGTERM; <kept>``. Returns the exit code and what
    ``run`` returned (None unless the code is 0)."""
    with _signals_exit():
        try:
            check()
        except Exception as exc:
            if debug:
                raise
            print(f"error: {describe(exc)}", file=sys.stderr)
            return EXIT_FAILED, None
    quiet = contextlib.nullcontext() if debug else _console_without_tracebacks()
    with _signals_raise() as signals, quiet:
        try:
            result = run()
            signals.settled()  # a signal whose exception was lost: the run completed regardless
        except (Terminated, KeyboardInterrupt, Exception) as exc:
            signals.settled()
            if signals.first is not None or isinstance(exc, (Terminated, KeyboardInterrupt)):
                print(f"error: {signals.stopped_by()}; {kept}", file=sys.stderr)
                return signals.exit_code(), None
            if debug:
                raise
            print(f"error: {describe(exc)}", file=sys.stderr)
            return EXIT_FAILED, None
    return 0, result


def _number(kind: type, low: float, what: str, high: float | None = None, strict: bool = False) -> Callable:
    """An argparse type: ``kind`` within [low, high] (``strict``: above ``low``), finite."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if (not math.isfinite(value) or value < low or (strict and value == low)
                or (high is not None and value > high)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


POSITIVE_INT = _number(int, 1, "an integer >= 1")
SEED = _number(int, 0, "an integer from 0 to 4294967295", high=2**32 - 1)
POSITIVE_FLOAT = _number(float, 0.0, "a number > 0", strict=True)


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except ``None`` (an override left to the preset, whose help
    says so)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block) and exit with EXIT_USAGE."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {message} (see --help)\n")
