"""Stage 4: train the UNet (best.ckpt, last.ckpt, history.csv); resumes a killed run's epochs.

``workers > 1`` trains data-parallel on that many msrun ranks (unet.distributed); their logs are
kept in the stage folder's ``logs/``. ``workers`` is part of the stage key: the gradients of N
ranks of batch B are averaged, an effective batch of N*B with 1/N of the steps, so the weights
differ from a single-process run. Multi-host (docs/distributed.md): ``workers`` counts the ranks
of all hosts, and this host is node 0 of ``UNET_MSRUN_NODES`` hosts reached at
``UNET_MSRUN_MASTER_ADDR:UNET_MSRUN_MASTER_PORT``; how the ranks are placed does not change the key.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from tasks.stage import StagePolicy, run_stage

POLICY = StagePolicy(stage="train", module="tasks/train.py", launched=("unet/msrun_worker.py",))


def cluster_from_env(workers: int):
    """The msrun job shape of ``workers`` ranks: all on this host, unless ``UNET_MSRUN_NODES`` > 1."""
    from unet.distributed import Cluster

    def number(name: str, default: str) -> int:
        value = os.environ.get(name, default)
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {value!r}") from None

    return Cluster(workers=workers, nodes=number("UNET_MSRUN_NODES", "1"),
                   master_addr=os.environ.get("UNET_MSRUN_MASTER_ADDR", "127.0.0.1"),
                   master_port=number("UNET_MSRUN_MASTER_PORT", "0"))


def dataset_pairs(datasets: dict, subset: str) -> list[tuple[Path, Path]]:
    """The (image, mask) paths of ``subset`` listed by the datasets stage."""
    spec = json.loads((Path(datasets["output"]) / datasets["dataset_json"]).read_text())
    root = Path(datasets["split_dir"])
    return [(root / img, root / msk) for img, msk in spec[subset]]


@task(name="train_unet", cache_policy=POLICY)
def train_unet(datasets: dict, recipe: dict, work_dir: str, refresh: bool = False, workers: int = 1) -> dict:
    """Train by ``recipe`` (on ``workers`` data-parallel msrun ranks when > 1); log every epoch and
    show training progress as a Prefect artifact."""
    from unet.distributed import launch
    from unet.recipes import Recipe
    from unet.train import train

    config = Recipe.from_dict(recipe)
    cluster = cluster_from_env(workers)  # ValueError on workers < 1 before anything starts
    logger = get_run_logger()
    progress = create_progress_artifact(0.0, description=f"UNet training ({config.name}, {config.epochs} epochs)")

    def on_epoch(row: dict) -> None:
        logger.info("epoch %d/%d loss %.4f | val acc %.4f iou %.4f dice %.4f sens %.4f spec %.4f | %.1f s",
                    row["epoch"], config.epochs, row["loss"], row["val_acc"], row["val_iou"], row["val_dice"],
                    row["val_sens"], row["val_spec"], row["seconds"])
        update_progress_artifact(progress, 100.0 * row["epoch"] / config.epochs)

    def build(folder):
        pairs = dataset_pairs(datasets, "train"), dataset_pairs(datasets, "val")
        if workers == 1:
            result = train(config, *pairs, folder, resume=True, on_epoch=on_epoch)
        else:
            logger.info("data-parallel training on %d msrun ranks (%d host(s)); logs in %s",
                        workers, cluster.nodes, Path(folder) / "logs")
            if cluster.nodes > 1:
                logger.info("on every other host K = 1..%d run: python -m unet.distributed %s --node-rank K",
                            cluster.nodes - 1, Path(folder).resolve() / "logs" / "job.json")
            result = launch(config, *pairs, folder, cluster, resume=True, on_epoch=on_epoch)
        logger.info("best val IoU %.4f at epoch %d", result.best_val_iou, result.best_epoch)
        out = {"best_checkpoint": "best.ckpt", "last_checkpoint": "last.ckpt", "history": "history.csv",
               "best_epoch": result.best_epoch, "best_val_iou": result.best_val_iou,
               "epochs_run": result.epochs_run, "label_shift": list(result.label_shift), "recipe": recipe}
        if workers > 1:
            out.update(workers=workers, logs="logs")
        return out

    result = run_stage(POLICY, build, resumable=True)
    update_progress_artifact(progress, 100.0)
    return result
