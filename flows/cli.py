"""The command line of the main job, ``python flows/full_pipeline.py``: arguments, input checks
before anything starts, one-line errors, exit codes, and SIGINT/SIGTERM/SIGHUP handling that never
leaves the temporary Prefect server behind (:mod:`flows.command`, shared with the segmentation's
command line); a watchdog (flows/watchdog.py) stops what the run started even after a SIGKILL. The
flow itself is :func:`flows.full_pipeline.full_pipeline`.

What a run does before its flow, in order: the arguments; the input paths; then Prefect's
temporary server is launched (when the database needs no migration) and starts while the stacks
and the work directory are checked and the flow's modules import (:func:`main`); a failed check
stops it again.
This module imports nothing heavy itself: ``--help`` and a usage error answer at once.
"""
from __future__ import annotations

import argparse
import errno
import logging
import signal
import sys
import tempfile
from pathlib import Path

from flows.command import (EXIT_USAGE, POSITIVE_FLOAT, POSITIVE_INT, SEED, _DefaultsHelp, _Parser, describe,
                           prefect_defaults, run_command)
from flows.parameters import RECIPE_OVERRIDES, resolve_recipe, resolve_scales
from flows.watchdog import watch_for_orphans
from unet.data_list import DEFAULT_DATA_DIR, TrainingInputs, check_combination, resolve_inputs
from unet.labels import DEFAULT_MEMBRANE_WIDTH, KINDS, check_membrane_width
from unet.recipes import PRESETS


def check_inputs(inputs: TrainingInputs, recipe: dict, split: str = "every_third", split_seed: int = 0,
                 membrane_width: int = DEFAULT_MEMBRANE_WIDTH) -> dict:
    """Validate every (image, labels) pair and the test volume exactly as the extract and split
    stages will, before anything starts: a bad file fails in a second with one line naming it,
    instead of after the temporary server's start-up, and nothing is written. Returns frame counts
    and shapes."""
    from unet.frames import read_image_volume, read_pair, volume_prefix
    from unet.split import assign_by_volume

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
    are checked before the flow starts (Prefect's temporary server is launched once the input paths
    exist and stopped again when a later check fails); every error is reported as one ``error:
    ...`` line on stderr, with a traceback only under ``--debug``."""
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

    starting = []  # the temporary server, launched once the input paths are checked

    def check() -> None:
        inputs = resolve_inputs(**data_args)  # before Prefect's import: a missing path answers at once
        prefect_defaults()
        from flows.temporary_server import begin_temporary_server

        # the server's start (seconds) overlaps what is left: reading the stacks, importing the flow
        starting.extend(filter(None, [begin_temporary_server(migrated_only=True)]))
        check_inputs(inputs, recipe, args.split, args.split_seed, args.membrane_width)
        check_work_dir(args.work_dir)  # created only for inputs that passed
        import flows.full_pipeline  # noqa: F401  (Prefect's flow machinery and the tasks)
        # MindSpore is imported by the stages that compute (a cached rerun never loads it, about
        # 3 s); a stop signal during that import is raised once it is done (_importing_mindspore).

    def run_flow() -> dict:
        from flows.full_pipeline import full_pipeline
        from flows.temporary_server import running_on, start_temporary_server

        with running_on(starting[0].ready() if starting else start_temporary_server()):
            return full_pipeline(**params)

    code, summary = run_command(args.debug, check, run_flow, "finished stages are kept and the next run reuses "
                                "them (training resumes from its last finished epoch)")
    if code != 0:
        for start in starting:
            start.cancel()  # a failed check or a failed run: stopped now rather than at exit
        return code
    from tasks.report import format_console

    print(format_console(summary))
    return code


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
