"""Stage 6: predict the test frames at native size: masks, the challenge's probability TIFF, overlays,
and a figure of a few of them (test_examples.png). With an ``alignment`` (the evaluate stage's
estimate for this model), every frame's probabilities are shifted by it first."""
from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task

from tasks.stage import StagePolicy, run_stage

POLICY = StagePolicy(stage="predict", module="tasks/predict.py")


@task(name="predict_test", cache_policy=POLICY)
def predict_test(datasets: dict, model: dict, recipe: dict, work_dir: str, alignment: dict | None = None,
                 tta_scales: list[float] | None = None, refresh: bool = False) -> dict:
    """Write test/masks/<stem>.png, test/probabilities.tif (float32 N x H x W), test/overlays and
    test_examples.png. ``tta_scales``: test-time scales (``unet.infer.predict_frame``; None: 1.0)."""

    from unet.align import Alignment
    from unet.backends import PIPELINE_BACKEND, load_predictor
    from unet.infer import predict_files
    from unet.recipes import Recipe
    from unet.viz import plot_predictions

    config = Recipe.from_dict(recipe)
    logger = get_run_logger()

    def build(folder):
        spec = json.loads((Path(datasets["output"]) / datasets["dataset_json"]).read_text())
        images = [Path(datasets["split_dir"]) / img for img in spec["test"]]
        net = load_predictor(Path(model["output"]) / model["best_checkpoint"], config, backend=PIPELINE_BACKEND)
        align = None if alignment is None else Alignment.from_dict(alignment)
        if align is not None:
            logger.info("test predictions shifted by dy %+.2f dx %+.2f px (the evaluate stage's alignment)",
                        align.dy, align.dx)
        def progress(i: int, n: int) -> None:
            if i % 10 == 0 or i == n:
                logger.info("test frame %d/%d", i, n)

        out = predict_files(net, images, config, folder / "test", tta=config.tta, align=align, on_frame=progress,
                            scales=tuple(tta_scales or (1.0,)))
        plot_predictions(images, out.cell_prob, folder / "test_examples.png")
        return {"test_masks": "test/masks", "test_probabilities": "test/probabilities.tif",
                "test_overlays": "test/overlays", "test_examples_png": "test_examples.png", "frames": out.frames}

    return run_stage(POLICY, build)
