"""Stage 5: metrics of the best checkpoint — the case's five on train and val as training's
per-epoch validation sees them (``unet.data.eval_transforms``: the case's 224 resize, or whole
frames without TTA for crop recipes), and native-size predictions of val (written) and train
(scored only) scored for both classes and with V_rand / V_info. Both run on ONNX Runtime
(``unet.backends.PIPELINE_BACKEND``, as the segmentation flow; the same probabilities as MindSpore
within 1e-5, 3.8x faster here, and no MindSpore graph to compile).

With ``align`` (the default), the sub-pixel shift that best maps the train frames' predictions onto
their labels (:mod:`unet.align`) is estimated here, applied to the val predictions before they are
scored and written, and returned for the predict stage; the val scores without it are kept as
``val_native_unaligned``.

Frames of several volumes may differ in size: predictions and scores are made frame by frame
(:func:`unet.evaluate.native_scores`), the alignment is estimated on the frames' common central
region (:func:`unet.data.central_crops`), and val predictions are written per volume
(``val/<volume>/masks``, ``val/<volume>/probabilities.tif``...; one volume: ``val/masks``... as ever)."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prefect import get_run_logger, task

from tasks.stage import StagePolicy, run_stage
from tasks.train import dataset_pairs

POLICY = StagePolicy(stage="evaluate", module="tasks/evaluate.py")


@task(name="evaluate", cache_policy=POLICY)
def evaluate(datasets: dict, model: dict, recipe: dict, work_dir: str, align: bool = True,
             tta_scales: list[float] | None = None, refresh: bool = False) -> dict:
    """Write metrics.json (train, val: as training's per-epoch validation; train_native,
    val_native: whole frames; alignment and val_native_unaligned), val predictions at native size
    (val/masks, val/probabilities.tif, val/overlays) and figures (history.png, val_examples.png).
    ``tta_scales``: the native-size predictions' test-time scales (``unet.infer.predict_frame``;
    None: the frame as it is)."""
    from unet.align import Alignment, estimate_shift, shift
    from unet.backends import PIPELINE_BACKEND, load_predictor
    from unet.data import SegmentationSource, central_crops, eval_transforms, volume_of
    from unet.evaluate import case_metrics, native_scores
    from unet.infer import predict_files, predict_frame
    from unet.recipes import Recipe
    from unet.viz import plot_examples, plot_history

    config = Recipe.from_dict(recipe)
    logger = get_run_logger()
    scales = tuple(tta_scales or (1.0,))

    def build(folder):
        # the figures are drawn in a thread of their own while the scoring (which releases the GIL
        # for most of its time) goes on
        with ThreadPoolExecutor(max_workers=1) as figures:
            history = figures.submit(plot_history, Path(model["output"]) / model["history"], folder / "history.png")
            return scored(folder, figures, history)

    def scored(folder, figures, history):
        checkpoint = Path(model["output"]) / model["best_checkpoint"]
        predictor = load_predictor(checkpoint, config, backend=PIPELINE_BACKEND)
        train_pairs, val_pairs = dataset_pairs(datasets, "train"), dataset_pairs(datasets, "val")
        sources = {name: SegmentationSource(pairs, eval_transforms(config), config.in_channels,
                                            sections=config.sections)
                   for name, pairs in (("train", train_pairs), ("val", val_pairs))}
        # whole native frames of different sizes (crop recipes, several volumes) cannot share a batch
        sizes = datasets.get("frame_shapes") or [None]
        batch = config.val_batch_size if config.input_mode == "resize" or len(sizes) == 1 else 1
        metrics = {name: case_metrics(predictor, src, batch) for name, src in sources.items()}
        # the frames and masks the sources have read (not read again)
        train_probs = [predict_frame(predictor, image, config, tta=config.tta, scales=scales)
                       for image in sources["train"].images]
        train_masks = sources["train"].masks
        alignment = (estimate_shift(central_crops(train_probs), central_crops(train_masks)) if align
                     else Alignment())
        if align:
            logger.info("alignment: predictions shifted by dy %+.2f dx %+.2f px (estimated on the %d train "
                        "frames: mean squared error %.4f -> %.4f)", alignment.dy, alignment.dx, len(train_pairs),
                        alignment.mse_before, alignment.mse_after)
        metrics["train_native"] = native_scores([shift(p, alignment.dy, alignment.dx) for p in train_probs],
                                                train_masks)
        by_volume: dict[str, list[Path]] = {}
        for img, _ in val_pairs:
            by_volume.setdefault(volume_of(img.name), []).append(img)
        probs, unaligned = [], []
        for volume, images in by_volume.items():  # in val order: the volumes' frames are sorted by name
            preds = predict_files(predictor, images, config, folder / "val" / volume, tta=config.tta,
                                  align=alignment if align else None, scales=scales)
            probs += list(preds.cell_prob)
            unaligned += list(preds.unaligned_prob) if align else []
        val_masks = sources["val"].masks
        examples = figures.submit(plot_examples, [img for img, _ in val_pairs], [m for _, m in val_pairs], probs,
                                  folder / "val_examples.png")
        metrics["val_native"] = native_scores(probs, val_masks)
        if align:  # a zero shift leaves the predictions as they are: the same scores, not scored twice
            moved = (alignment.dy, alignment.dx) != (0, 0)
            metrics["val_native_unaligned"] = (native_scores(unaligned, val_masks) if moved
                                               else dict(metrics["val_native"]))
        metrics["alignment"] = {"applied": align, **alignment.to_dict()}
        metrics["tta_scales"] = list(scales)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
        history.result()  # both figures drawn (an error of theirs is raised here)
        examples.result()
        for name, m in metrics.items():
            if name in ("alignment", "tta_scales"):
                continue
            logger.info("%-10s acc %.4f iou %.4f dice %.4f sens %.4f spec %.4f", name, m["acc"], m["iou"],
                        m["dice"], m["sens"], m["spec"])
        native = metrics["val_native"]
        logger.info("val native: membrane dice %.4f iou %.4f, V_rand %.4f, V_info %.4f "
                    "(membrane filled: V_rand %.4f, V_info %.4f)", native["membrane_dice"], native["membrane_iou"],
                    native["v_rand"], native["v_info"], native["v_rand_filled"], native["v_info_filled"])
        one = list(by_volume) == [""]
        return {"metrics": metrics, "model_output": model["output"], "metrics_json": "metrics.json",
                "val_predictions": "val/masks" if one else "val", "val_overlays": "val/overlays" if one else "val",
                "val_probabilities": "val/probabilities.tif" if one else "val",
                "history_png": "history.png", "examples_png": "val_examples.png"}

    return run_stage(POLICY, build)
