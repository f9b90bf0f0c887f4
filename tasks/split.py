"""Stage 2: the labelled frames -> a 2:1 train/val split in the case's layout, plus split.csv."""
from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from tasks.stage import StagePolicy, run_stage

POLICY = StagePolicy(stage="split", module="tasks/split.py")


@task(name="split_dataset", cache_policy=POLICY)
def split_dataset(frames: dict, mode: str, seed: int, work_dir: str, refresh: bool = False) -> dict:
    """Write train/{image,mask}, val/{image,mask}, test_imgs and split.csv (pairs by file stem)."""
    from unet.split import split_dataset as split

    def build(folder):
        table = split(Path(frames["output"]), folder, mode=mode, seed=seed)
        counts = {s: int((table["subset"] == s).sum()) for s in ("train", "val", "test")}
        get_run_logger().info("split (%s, seed %d): %d train, %d val, %d test frames",
                              mode, seed, counts["train"], counts["val"], counts["test"])
        return {"split_csv": "split.csv", "counts": counts, "mode": mode, "seed": seed}

    return run_stage(POLICY, build)
