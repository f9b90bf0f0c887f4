"""Stage 6: predict the test frames at native size: masks, the challenge's probability TIFF, overlays."""
from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task

from tasks.stage import StagePolicy, run_stage

POLICY = StagePolicy(stage="predict", code=("tasks/predict.py", "tasks/stage.py", "unet/infer.py",
                                            "unet/model.py", "unet/data.py"))


@task(name="predict_test", cache_policy=POLICY)
def predict_test(datasets: dict, model: dict, recipe: dict, work_dir: str, refresh: bool = False) -> dict:
    """Write test/masks/<stem>.png, test/probabilities.tif (float32 N x H x W) and test/overlays."""
    from unet.infer import load_model, predict_files
    from unet.recipes import Recipe

    config = Recipe.from_dict(recipe)
    logger = get_run_logger()

    def build(folder):
        spec = json.loads((Path(datasets["output"]) / datasets["dataset_json"]).read_text())
        images = [Path(datasets["split_dir"]) / img for img in spec["test"]]
        net = load_model(Path(model["output"]) / model["best_checkpoint"], config)
        out = predict_files(net, images, config, folder / "test", tta=config.tta,
                            on_frame=lambda i, n: logger.info("test frame %d/%d", i, n) if i % 10 == 0 or i == n else None)
        return {"test_masks": "test/masks", "test_probabilities": "test/probabilities.tif",
                "test_overlays": "test/overlays", "frames": out.frames}

    return run_stage(POLICY, build)
