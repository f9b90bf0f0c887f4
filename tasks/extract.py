"""Stage 1: the three TIFF stacks -> one PNG per frame (images/, masks/, test/)."""
from __future__ import annotations

from prefect import get_run_logger, task

from tasks.stage import StagePolicy, run_stage

POLICY = StagePolicy(stage="extract", module="tasks/extract.py", files=("train_volume", "train_labels", "test_volume"))


@task(name="extract_frames", cache_policy=POLICY)
def extract_frames(train_volume: str, train_labels: str, test_volume: str, work_dir: str,
                   refresh: bool = False) -> dict:
    """Read and validate the stacks; write ``00000.png``, ``00001.png``... per frame."""
    from unet.frames import extract_volumes

    def build(folder):
        info = extract_volumes(train_volume, train_labels, test_volume, folder)
        get_run_logger().info("extracted %s labelled and %s test frames of %s",
                              info["train_frames"], info["test_frames"], info["frame_shape"])
        return {"images": "images", "masks": "masks", "test": "test", **info}

    return run_stage(POLICY, build)
