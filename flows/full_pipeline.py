"""The main job: ISBI 2012 TIFF stacks -> trained, evaluated UNet and test-set prediction.

    extract_frames -> split_dataset -> build_datasets -> train_unet -> evaluate -> predict_test

Every stage is cached by the content of its inputs, its parameters and its code: a rerun with
nothing changed reports every stage Cached and takes seconds. Run ``python flows/full_pipeline.py
--help`` for the options.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Offline machines: no telemetry; a first start of the temporary server migrates a new database.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "unet")

from prefect import flow, runtime  # noqa: E402

from tasks.datasets import build_datasets  # noqa: E402
from tasks.evaluate import evaluate  # noqa: E402
from tasks.extract import extract_frames  # noqa: E402
from tasks.predict import predict_test  # noqa: E402
from tasks.promote import promote_champion, read_champion  # noqa: E402
from tasks.report import build_summary, format_console, publish_artifacts, write_summary  # noqa: E402
from tasks.split import split_dataset  # noqa: E402
from tasks.stage import call_stage  # noqa: E402
from tasks.train import train_unet  # noqa: E402
from unet.recipes import PRESETS, get_preset  # noqa: E402

VOLUMES = ("train-volume.tif", "train-labels.tif", "test-volume.tif")


def resolve_recipe(preset: str, **overrides) -> dict:
    """The preset with the given overrides, validated (ValueError on a bad value)."""
    return get_preset(preset).replace(**overrides).to_dict()


def volume_paths(data_dir: str) -> dict[str, str]:
    """The three ISBI stacks in ``data_dir``; FileNotFoundError naming what is missing."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: data folder not found (expected {', '.join(VOLUMES)} in it)")
    missing = [name for name in VOLUMES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(missing)}")
    return {"train_volume": str(folder / VOLUMES[0]), "train_labels": str(folder / VOLUMES[1]),
            "test_volume": str(folder / VOLUMES[2])}


@flow(name="full-pipeline")
def full_pipeline(data_dir: str = "datasets/ISBI", work_dir: str = "artifacts", preset: str = "seed",
                  epochs: int | None = None, batch_size: int | None = None, base_channels: int | None = None,
                  learning_rate: float | None = None, tta: bool | None = None, seed: int | None = None,
                  split: str = "every_third", split_seed: int = 0, refresh: bool = False) -> dict:
    """Extract, split, build datasets, train, evaluate, keep the better of the new model and the
    champion, and predict the test frames with the champion; returns the run summary."""
    recipe = resolve_recipe(preset, epochs=epochs, batch_size=batch_size, base_channels=base_channels,
                            learning_rate=learning_rate, tta=tta, seed=seed)
    work = str(Path(work_dir).resolve())
    stages = {}
    stages["extract"] = call_stage(extract_frames, refresh=refresh, work_dir=work, **volume_paths(data_dir))
    stages["split"] = call_stage(split_dataset, refresh=refresh, frames=stages["extract"][2], mode=split,
                                 seed=split_seed, work_dir=work)
    stages["datasets"] = call_stage(build_datasets, refresh=refresh, split=stages["split"][2],
                                    image_size=recipe["image_size"], input_mode=recipe["input_mode"],
                                    in_channels=recipe["in_channels"], augmentation=recipe["augmentation"],
                                    work_dir=work)
    datasets = stages["datasets"][2]
    stages["train"] = call_stage(train_unet, refresh=refresh, datasets=datasets, recipe=recipe, work_dir=work)
    model = stages["train"][2]
    stages["evaluate"] = call_stage(evaluate, refresh=refresh, datasets=datasets, model=model, recipe=recipe,
                                    work_dir=work)
    champion = read_champion(work)
    champion_evaluation = None
    if champion is not None and champion["model"]["key"] != model["key"]:
        champion_evaluation = call_stage(evaluate, datasets=datasets, model=champion["model"],
                                         recipe=champion["recipe"], work_dir=work)[2]
    run_name = runtime.flow_run.name or "local"
    decision = promote_champion(work, model, recipe, stages["evaluate"][2], champion, champion_evaluation, run_name)
    stages["predict"] = call_stage(predict_test, refresh=refresh, datasets=datasets,
                                   model=decision["champion"]["model"], recipe=decision["champion"]["recipe"],
                                   work_dir=work)
    parameters = {"data_dir": str(Path(data_dir).resolve()), "work_dir": work, "preset": preset,
                  "split": split, "split_seed": split_seed, "recipe": recipe}
    summary = build_summary(run_name, parameters, stages, decision)
    write_summary(work, summary)
    publish_artifacts(summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python flows/full_pipeline.py",
        description="Train, evaluate and apply a UNet to the ISBI 2012 EM stacks (cached Prefect pipeline).",
        epilog="Presets: " + "; ".join(f"{k}: {v.base_channels}-channel UNet, {v.image_size}px "
                                       f"{v.input_mode}, {v.epochs} epochs" for k, v in PRESETS.items()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default="datasets/ISBI",
                   help="folder with train-volume.tif, train-labels.tif, test-volume.tif")
    p.add_argument("--work-dir", default="artifacts", help="where stage folders and run summaries go")
    p.add_argument("--preset", default="seed", choices=sorted(PRESETS), help="training recipe")
    p.add_argument("--epochs", type=int, help="override the preset's number of epochs")
    p.add_argument("--batch-size", type=int, help="override the preset's training batch size")
    p.add_argument("--base-channels", type=int, help="override the UNet width (channels of the first block)")
    p.add_argument("--learning-rate", type=float, help="override the preset's Adam learning rate")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="8-fold flip/rotate test-time augmentation (default: the preset's)")
    p.add_argument("--seed", type=int, help="random seed of initialisation and augmentation")
    p.add_argument("--split", default="every_third", choices=["every_third", "random"],
                   help="train/val split: the case's every third frame to val, or a seeded random 2:1")
    p.add_argument("--split-seed", type=int, default=0, help="seed of --split random")
    p.add_argument("--refresh", action="store_true", help="recompute every stage, ignoring caches")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = {k: v for k, v in vars(args).items() if k != "debug"}
    try:
        resolve_recipe(args.preset, epochs=args.epochs, batch_size=args.batch_size,
                       base_channels=args.base_channels, learning_rate=args.learning_rate, tta=args.tta,
                       seed=args.seed)
        volume_paths(args.data_dir)
        summary = full_pipeline(**params)
    except (ValueError, FileNotFoundError, PermissionError, OSError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_console(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
