"""Stage 4: train the UNet (best.ckpt, last.ckpt, history.csv); resumes a killed run's epochs."""
from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from tasks.stage import StagePolicy, run_stage

POLICY = StagePolicy(stage="train", code=("tasks/train.py", "tasks/stage.py", "unet/train.py", "unet/model.py",
                                          "unet/data.py", "unet/metrics.py", "unet/recipes.py"))


def dataset_pairs(datasets: dict, subset: str) -> list[tuple[Path, Path]]:
    """The (image, mask) paths of ``subset`` listed by the datasets stage."""
    spec = json.loads((Path(datasets["output"]) / datasets["dataset_json"]).read_text())
    root = Path(datasets["split_dir"])
    return [(root / img, root / msk) for img, msk in spec[subset]]


@task(name="train_unet", cache_policy=POLICY)
def train_unet(datasets: dict, recipe: dict, work_dir: str, refresh: bool = False) -> dict:
    """Train by ``recipe``; log every epoch and show training progress as a Prefect artifact."""
    from unet.recipes import Recipe
    from unet.train import train

    config = Recipe.from_dict(recipe)
    logger = get_run_logger()
    progress = create_progress_artifact(0.0, description=f"UNet training ({config.name}, {config.epochs} epochs)")

    def on_epoch(row: dict) -> None:
        logger.info("epoch %d/%d loss %.4f | val acc %.4f iou %.4f dice %.4f sens %.4f spec %.4f | %.1f s",
                    row["epoch"], config.epochs, row["loss"], row["val_acc"], row["val_iou"], row["val_dice"],
                    row["val_sens"], row["val_spec"], row["seconds"])
        update_progress_artifact(progress, 100.0 * row["epoch"] / config.epochs)

    def build(folder):
        result = train(config, dataset_pairs(datasets, "train"), dataset_pairs(datasets, "val"), folder,
                       resume=True, on_epoch=on_epoch)
        logger.info("best val IoU %.4f at epoch %d", result.best_val_iou, result.best_epoch)
        return {"best_checkpoint": "best.ckpt", "last_checkpoint": "last.ckpt", "history": "history.csv",
                "best_epoch": result.best_epoch, "best_val_iou": result.best_val_iou,
                "epochs_run": result.epochs_run, "recipe": recipe}

    result = run_stage(POLICY, build, resumable=True)
    update_progress_artifact(progress, 100.0)
    return result
