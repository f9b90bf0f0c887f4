"""The command line of the main job, ``python flows/full_pipeline.py``: arguments, input checks
before anything starts, one-line errors, exit codes, and SIGINT/SIGTERM/SIGHUP handling that never
leaves the temporary Prefect server behind; a watchdog (flows/watchdog.py) stops what the run started
even after a SIGKILL. The flow itself is :func:`flows.full_pipeline.full_pipeline`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import functools
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import types
from pathlib import Path
from typing import Callable, Iterator, NoReturn

from flows.full_pipeline import full_pipeline
from flows.parameters import RECIPE_OVERRIDES, resolve_recipe, resolve_scales
from flows.watchdog import watch_for_orphans
from tasks.report import format_console
from tasks.stage import _locked
from unet.data_list import DEFAULT_DATA_DIR, TrainingInputs, check_combination, resolve_inputs
from unet.frames import read_image_volume, read_pair, volume_prefix
from unet.labels import DEFAULT_MEMBRANE_WIDTH, KINDS, check_membrane_width
from unet.recipes import PRESETS
from unet.split import assign_by_volume


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


def check_inputs(inputs: TrainingInputs, recipe: dict, split: str = "every_third", split_seed: int = 0,
                 membrane_width: int = DEFAULT_MEMBRANE_WIDTH) -> dict:
    """Validate every (image, labels) pair and the test volume exactly as the extract and split
    stages will, before anything starts: a bad file fails in a second with one line naming it,
    instead of after the temporary server's start-up, and nothing is written. Returns frame counts
    and shapes."""
    notes = [logging.getLogger(name) for name in ("unet.frames", "unet.volume_io")]
    levels = [logger.level for logger in notes]
    for logger in notes:
        logger.setLevel(logging.ERROR)  # conversion notes are logged once, by the extract stage
    try:
        shapes, volumes = [], {}
        for k, pair in enumerate(inputs.pairs):
            images, _ = read_pair(pair, membrane_width)
            h, w = images.shape[1:]
            if recipe["input_mode"] == "crop" and min(h, w) < recipe["image_size"]:
                raise ValueError(f"{pair['image']}: frames are {h}x{w}, smaller than the {recipe['image_size']}px "
                                 f"crops of the {recipe['name']!r} recipe; use a smaller --image-size or a resize "
                                 f"preset (seed, smoke)")
            shapes.append([h, w])
            prefix = volume_prefix(k, len(inputs.pairs))
            volumes.update({f"{prefix}{i:05d}": str(k) for i in range(len(images))})
        test = None if inputs.test_volume is None else read_image_volume(inputs.test_volume)
    finally:
        for logger, level in zip(notes, levels):
            logger.setLevel(level)
    try:
        assign_by_volume(volumes, mode=split, seed=split_seed)
    except ValueError as exc:
        raise ValueError(f"{inputs.pairs[-1]['labels']}: {exc}") from None
    return {"train_frames": len(volumes), "frame_shape": shapes[0], "frame_shapes": shapes,
            "test_frames": 0 if test is None else len(test),
            "test_frame_shape": None if test is None else list(test.shape[1:])}


def check_work_dir(work_dir: str) -> Path:
    """Create the work directory if needed and make sure files can be created in it."""
    work = Path(work_dir).expanduser().resolve()
    if work.exists() and not work.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "work directory exists and is not a folder", str(work))
    try:
        work.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=work):
            pass
    except OSError as exc:
        what = "written to" if work.is_dir() else "created"
        raise OSError(exc.errno, f"work directory cannot be {what} ({exc.strerror or exc})", str(work)) from None
    return work


def _server_class() -> type:
    """Prefect's temporary server, started in a session of its own: a signal to the run's process
    group (Ctrl-C in a terminal, a supervisor's stop) then reaches the run alone, which reports its
    end to the server and stops it, instead of the server dying under a run still talking to it
    (measured before: exit 1 after 149 s of "Connection refused"). Prefect starts the server with
    ``subprocess.Popen`` in :meth:`_run_uvicorn_command`; this subclass gives that call
    ``start_new_session=True``. Prefect's ``SubprocessASGIServer()`` returns this instance (one per
    port, the subclass shares the base class's registry), so the flow uses it."""
    from prefect.server.api import server as prefect_server

    class OwnSessionServer(prefect_server.SubprocessASGIServer):
        def _run_uvicorn_command(self):
            real = prefect_server.subprocess
            prefect_server.subprocess = types.SimpleNamespace(
                Popen=functools.partial(real.Popen, start_new_session=True))
            try:
                return super()._run_uvicorn_command()
            finally:
                prefect_server.subprocess = real

    return OwnSessionServer


def start_temporary_server():
    """Start Prefect's temporary server now, one process at a time per ``PREFECT_HOME``, in a
    session of its own (:func:`_server_class`), after :func:`watch_for_orphans`.

    Without ``PREFECT_API_URL`` every run starts its own server on ``$PREFECT_HOME/prefect.db``,
    and each server's start-up migrates that database and registers Prefect's block types. Two
    runs starting together race there (the servers log IntegrityError tracebacks; two migrations
    of a new database can fail). Prefect keeps one temporary server per process and the flow uses
    this one; it is stopped when the process exits (an ``atexit`` hook), or by the watchdog when the
    process is killed. Returns the server (None when a server is configured, ``PREFECT_API_URL``)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    watch_for_orphans()
    home = Path(PREFECT_HOME.value()).expanduser()
    with _locked(home / ".temporary-server-start.lock"):
        server = _server_class()()
        server.start()
    return server


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


def _membrane_width(text: str) -> int:
    """An argparse type: an even number of pixels >= 2."""
    try:
        return check_membrane_width(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an even number of pixels >= 2, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python flows/full_pipeline.py",
        description="Train, evaluate and apply a UNet to labelled EM volumes: an ISBI 2012 folder (--data-dir), "
                    "a volume and its labels (--train-volume, --train-labels) or a data list of them (--data-list) "
                    "(cached Prefect pipeline).",
        epilog="Presets: " + "; ".join(f"{k}: {v.base_channels}-channel UNet, {v.image_size}px "
                                       f"{v.input_mode}, {v.epochs} epochs" for k, v in PRESETS.items())
               + ". Exit codes: 0 done, 1 failed (bad input, disk full, ...), 2 invalid arguments, "
                 "130 interrupted, 143 terminated.",
        formatter_class=_DefaultsHelp)
    p.add_argument("--data-dir", help=f"folder with train-volume.tif, train-labels.tif (membrane labels), "
                                      f"test-volume.tif, as ISBI 2012 (default: {DEFAULT_DATA_DIR}, when neither "
                                      f"--train-volume nor --data-list is given)")
    p.add_argument("--train-volume", metavar="PATH",
                   help="the training images: a TIFF stack, a folder of PNG/TIFF frames or a Zarr/OME-Zarr array")
    p.add_argument("--train-labels", metavar="PATH", help="their labels (same frame count and size), in any of "
                                                          "those formats; their kind: --labels-kind")
    p.add_argument("--labels-kind", choices=KINDS,
                   help="what --train-labels hold: membrane (0 = membrane, other values = cell: ISBI), cells "
                        "(the inverse), instances (an integer id per cell, 0 = not cell) (default: membrane)")
    p.add_argument("--data-list", metavar="FILE",
                   help="a CSV with the columns image,labels,kind, one row per pair (paths relative to the "
                        "file), to train on several volumes (a .yaml list of such mappings works too)")
    p.add_argument("--test-volume", metavar="PATH",
                   help="with --train-volume or --data-list: a volume to predict with the champion; without "
                        "one the predict stage is skipped")
    p.add_argument("--membrane-width", type=_membrane_width, default=DEFAULT_MEMBRANE_WIDTH,
                   help="instance labels: pixels of membrane drawn where two cells touch, half from each "
                        "(an even number; find_boundaries' own boundary is 2)")
    p.add_argument("--work-dir", default="artifacts", help="where stage folders and run summaries go")
    p.add_argument("--preset", default="seed", choices=sorted(PRESETS), help="training recipe")
    p.add_argument("--epochs", type=POSITIVE_INT, help="override the preset's number of epochs")
    p.add_argument("--batch-size", type=POSITIVE_INT, help="override the preset's training batch size")
    p.add_argument("--image-size", type=POSITIVE_INT,
                   help="override the preset's training size: the side of the random crops (crop presets: "
                        "fullres) or of the resized frames (resize presets: seed, smoke); a multiple of 16")
    p.add_argument("--base-channels", type=POSITIVE_INT,
                   help="override the UNet width (channels of the first block)")
    p.add_argument("--learning-rate", type=POSITIVE_FLOAT, help="override the preset's Adam learning rate")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="8-fold flip/rotate test-time augmentation (default: the preset's)")
    p.add_argument("--seed", type=SEED, help="random seed of initialisation and augmentation (default: the preset's)")
    p.add_argument("--align", action=argparse.BooleanOptionalAction, default=True,
                   help="shift val and test predictions by the sub-pixel offset between the train frames' "
                        "predictions and their labels (unet/align.py)")
    p.add_argument("--tta-scales", type=POSITIVE_FLOAT, nargs="+", metavar="SCALE",
                   help="average the native-size predictions of the frame resized by each SCALE, e.g. "
                        "0.875 1 1.125 (default: the preset's; fullres: 0.875 1 1.125, the others: 1)")
    p.add_argument("--register-labels", action=argparse.BooleanOptionalAction, default=None,
                   help="train on labels shifted onto their images' membranes by the offset estimated from "
                        "the train frames (default: the preset's; unet.data.label_offset)")
    p.add_argument("--sections", type=int, choices=[1, 3],
                   help="consecutive sections the network sees: 1, the frame alone; 3, the frame between the "
                        "sections before and after it in its stack, as 3 input channels (default: the preset's)")
    p.add_argument("--split", default="every_third", choices=["every_third", "random"],
                   help="train/val split: the case's every third frame to val, or a seeded random 2:1")
    p.add_argument("--split-seed", type=SEED, default=0, help="seed of --split random")
    p.add_argument("--workers", type=POSITIVE_INT, default=1,
                   help="data-parallel training processes started with msrun (docs/distributed.md)")
    p.add_argument("--refresh", action="store_true", help="recompute every stage, ignoring caches")
    p.add_argument("--verify", action="store_true",
                   help="before reusing a stage folder, check every file against the sha256 in its manifest "
                        "(sizes are always checked); a damaged stage is computed again")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code. Arguments, the three stacks and the work directory
    are checked before the flow (and Prefect's temporary server) starts; every error is reported as
    one ``error: ...`` line on stderr, with a traceback only under ``--debug``."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or an argument error already printed as one line
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    params = {k: v for k, v in vars(args).items() if k != "debug"}
    data_args = {k: params[k] for k in ("data_dir", "train_volume", "train_labels", "test_volume", "labels_kind",
                                         "data_list")}
    try:
        recipe = resolve_recipe(args.preset, **{k: params[k] for k in RECIPE_OVERRIDES})
        resolve_scales(args.preset, args.tta_scales)
        check_combination(**data_args)
    except ValueError as exc:
        print(f"error: {describe(exc)} (see --help)", file=sys.stderr)
        return EXIT_USAGE
    with _signals_exit():
        try:
            check_inputs(resolve_inputs(**data_args), recipe, args.split, args.split_seed, args.membrane_width)
            check_work_dir(args.work_dir)
            # MindSpore is imported by the stages that compute (a cached rerun never loads it, about
            # 3 s); a stop signal during that import is raised once it is done (_importing_mindspore).
        except Exception as exc:
            if args.debug:
                raise
            print(f"error: {describe(exc)}", file=sys.stderr)
            return EXIT_FAILED
    quiet = contextlib.nullcontext() if args.debug else _console_without_tracebacks()
    with _signals_raise() as signals, quiet:
        try:
            start_temporary_server()
            summary = full_pipeline(**params)
            signals.settled()  # a signal whose exception was lost: the run completed regardless
        except (Terminated, KeyboardInterrupt, Exception) as exc:
            signals.settled()
            if signals.first is not None or isinstance(exc, (Terminated, KeyboardInterrupt)):
                print(f"error: {signals.stopped_by()}; finished stages are kept and the next run reuses them "
                      "(training resumes from its last finished epoch)", file=sys.stderr)
                return signals.exit_code()
            if args.debug:
                raise
            print(f"error: {describe(exc)}", file=sys.stderr)
            return EXIT_FAILED
        print(format_console(summary))
    return 0


def run() -> int:
    """The process's entry point: :func:`watch_for_orphans` first (msrun or a server started under
    ``PREFECT_API_URL`` die with the run too), :func:`main`, then ignore SIGINT and SIGTERM while the
    interpreter shuts down: shutdown stops the temporary Prefect server (an atexit hook, up to 5 s),
    and a second signal must not cut that short."""
    watch_for_orphans()
    code = main()
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, signal.SIG_IGN)
    return code
