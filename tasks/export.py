"""Export a trained model for serving: ONNX + MindIR + model.json (unet/export.py), from the
champion or any train stage folder, with what inference needs to know beside the weights: recipe,
input rules, threshold, alignment shift, TTA, the training data's key and the val scores.

:func:`export_model` is a plain function (``python flows/export.py`` calls it without Prefect);
:func:`export_champion` is the step the pipeline runs after the champion decision, so that
``<work_dir>/champion-export/`` always holds the current champion."""
from __future__ import annotations

import json
import platform
import time
from importlib.metadata import version
from pathlib import Path
from typing import Callable

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.segment import THRESHOLD, resolve_model
from tasks.stage import _locked, file_digest

CHAMPION_EXPORT = "champion-export"


def _training_data(model: dict) -> str | None:
    """The key of the datasets stage the model was trained on (it chains the TIFFs' content)."""
    manifest = Path(model["checkpoint"]).parent / "manifest.json"
    return json.loads(manifest.read_text())["inputs"].get("datasets") if manifest.is_file() else None


def _dataset_pairs(model: dict, split: str) -> list[tuple[Path, Path]]:
    """The (image, mask) pairs of ``split`` of the datasets stage the model was trained on, from its
    folder in the model's work directory. Empty when that stage is not there (a model copied out of
    its work directory)."""
    from tasks.train import dataset_pairs

    key = _training_data(model)
    folder = Path(model["checkpoint"]).parents[2] / "datasets" / key.split(":", 1)[1] if key else None
    if folder is None or not (folder / "manifest.json").is_file():
        return []
    datasets = {"output": str(folder), **json.loads((folder / "manifest.json").read_text())["result"]}
    return [(image, mask) for image, mask in dataset_pairs(datasets, split) if image.is_file()]


def training_frames(model: dict) -> list[Path]:
    """The train frames (images) the model was trained on: what int8 calibrates on (the val frames
    stay unseen, as they are by training). Empty when they are not found."""
    return [image for image, _ in _dataset_pairs(model, "train")]


def int8_check(model: dict) -> Callable[[Path], dict] | None:
    """What scores an int8 model of ``model``: its val frames segmented as the segmentation flow
    does (the block engine at the model's TTA, test-time scales and alignment shift), scored at native
    size and compared with the model's own val scores from its evaluate stage (fp32, ``model["val"]``)
    by :func:`unet.evaluate.scores_kept`: ``keeps_scores`` makes int8 the segmentation's default
    precision for this model. None when the val frames or the val scores are not there."""
    from unet.evaluate import KEPT_SCORES

    pairs = _dataset_pairs(model, "val")
    if not pairs or any(k not in model["val"] for k in KEPT_SCORES):
        return None

    def check(path: Path) -> dict:
        from unet.backends import OnnxPredictor
        from unet.blocks import Settings, predict_array
        from unet.data import read_sections
        from unet.evaluate import native_scores, read_mask_frames, scores_kept
        from unet.recipes import Recipe
        from unet.tta import tta_level

        t0 = time.perf_counter()
        predictor = OnnxPredictor(path, 0)
        recipe = Recipe.from_dict(model["recipe"])
        settings = Settings(recipe, tta=tta_level(recipe.tta), scales=tuple(model["tta_scales"]), shift=tuple(model["shift"]))
        probs = [predict_array(predictor, read_sections(image, recipe.sections), settings) for image, _ in pairs]
        scores = native_scores(probs, read_mask_frames([mask for _, mask in pairs]))
        return {**scores_kept(scores, model["val"]), "frames": len(pairs),
                "seconds": round(time.perf_counter() - t0, 1)}

    return check


def export_model(model: str, work_dir: str, out: str) -> dict:
    """Export ``model`` (``champion``, a train stage folder or a checkpoint in one; resolved in
    ``work_dir``) into the folder ``out``, with an int8 model calibrated on its training frames
    when they are found (:func:`training_frames`) and scored on its val frames (:func:`int8_check`);
    returns model.json's content."""
    from unet.data import read_sections
    from unet.export import write_export
    from unet.recipes import Recipe
    from unet.tta import tta_level

    m = resolve_model(model, work_dir)
    if m.get("onnx"):
        raise ValueError(f"{model}: already an export (it has model.json); export a train stage folder or the champion")
    recipe = Recipe.from_dict(m["recipe"])
    sidecar = {"model_key": m["key"], "train_key": m["train_key"], "source": m["source"], "threshold": THRESHOLD,
               "alignment_shift": m["shift"], "tta": tta_level(recipe.tta), "tta_scales": m["tta_scales"],
               "training_data": _training_data(m), "val": m["val"],
               "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "versions": {"python": platform.python_version(),
                            **{p: version(p) for p in ("mindspore", "onnx", "onnxruntime", "numpy")}}}
    frames = [read_sections(path, recipe.sections) for path in training_frames(m)]
    return write_export(m["checkpoint"], recipe, out, sidecar, calibration_frames=frames,
                        int8_check=int8_check(m))


@task(name="export_champion", cache_policy=NO_CACHE)
def export_champion(work_dir: str) -> str:
    """``<work_dir>/champion-export/`` for the current champion, written again only when it is not
    the champion's as the work directory now knows it: other weights (the checkpoint's sha256), other
    val scores, alignment shift or test-time scales (a newer evaluation), or no int8 model or no int8
    check where the champion's training and val frames allow them."""
    from unet.export import SIDECAR

    out = Path(work_dir) / CHAMPION_EXPORT
    # two runs on one work dir: the second waits, then finds the export up to date (the writers'
    # temporary files have fixed names beside the export)
    with _locked(Path(work_dir) / ".locks" / f"{CHAMPION_EXPORT}.lock"):
        m = resolve_model("champion", work_dir)
        current = json.loads((out / SIDECAR).read_text()) if (out / SIDECAR).is_file() else {}
        same_model = (current.get("sha256", {}).get("checkpoint") == file_digest(Path(m["checkpoint"]))
                      and [current.get(k) for k in ("val", "alignment_shift", "tta_scales")]
                      == [m["val"], m["shift"], m["tta_scales"]])
        int8 = current.get("int8") or {}
        int8_done = (int8.get("check") is not None or int8_check(m) is None) if int8 else not training_frames(m)
        if same_model and int8_done:
            get_run_logger().info("champion export up to date: %s", out)
            return str(out)
        record = export_model("champion", work_dir, str(out))
    get_run_logger().info("champion exported to %s (ONNX %s..., int8: %s)", out, record["sha256"]["onnx"][:12],
                          int8_summary(record))
    return str(out)


def int8_summary(record: dict) -> str:
    """One line on an export's int8 model (model.json's content ``record``): calibration and check."""
    int8 = record.get("int8")
    if not int8:
        return "none, the model's training frames were not found"
    line = f"calibrated on {int8['calibration_frames']} training frames"
    check = int8.get("check")
    if not check:
        return line + "; not checked (no val frames or val scores), so segmentation defaults to fp32"
    scores = ", ".join(f"{k} {check['val'][k]:.4f} (fp32 {check['reference'][k]:.4f})" for k in check["val"])
    verdict = ("keeps the scores: segmentation defaults to int8" if check["keeps_scores"] else
               f"loses {check['loss']['value']:.4f} of {check['loss']['score']} (tolerance {check['tolerance']}): "
               "segmentation defaults to fp32")
    return f"{line}; on {check['frames']} val frames {scores}: {verdict}"
