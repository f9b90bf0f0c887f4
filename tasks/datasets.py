"""Stage 3: check the split and write the dataset manifest (dataset.json) that training reads."""
from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task

from tasks.stage import StagePolicy, run_stage

POLICY = StagePolicy(stage="datasets", module="tasks/datasets.py")


@task(name="build_datasets", cache_policy=POLICY)
def build_datasets(split: dict, image_size: int, input_mode: str, in_channels: int, augmentation: str,
                   work_dir: str, refresh: bool = False) -> dict:
    """Pairs, counts and frame shapes of train/val/test, checked against the recipe's input."""
    from unet.dataset_check import describe_split

    def build(folder):
        spec = describe_split(Path(split["output"]), image_size=image_size, input_mode=input_mode,
                              in_channels=in_channels, augmentation=augmentation)
        (folder / "dataset.json").write_text(json.dumps(spec, indent=2))
        get_run_logger().info("datasets: %d train / %d val / %d test frames of %s, network input %s",
                              len(spec["train"]), len(spec["val"]), len(spec["test"]),
                              " and ".join("x".join(map(str, shape)) for shape in spec["frame_shapes"]),
                              spec["network_input"])
        return {"dataset_json": "dataset.json", "split_dir": split["output"], "frame_shape": spec["frame_shape"],
                "frame_shapes": spec["frame_shapes"], "counts": {s: len(spec[s]) for s in ("train", "val", "test")}}

    return run_stage(POLICY, build)
