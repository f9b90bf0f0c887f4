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

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.segment import THRESHOLD, resolve_model
from tasks.stage import _locked, file_digest

CHAMPION_EXPORT = "champion-export"


def _training_data(model: dict) -> str | None:
    """The key of the datasets stage the model was trained on (it chains the TIFFs' content)."""
    manifest = Path(model["checkpoint"]).parent / "manifest.json"
    return json.loads(manifest.read_text())["inputs"].get("datasets") if manifest.is_file() else None


def training_frames(model: dict) -> list[Path]:
    """The train frames (images) of the datasets stage the model was trained on, from its folder in
    the model's work directory: what int8 calibrates on (the val frames stay unseen, as they are by
    training). Empty when that stage is not there (a model copied out of its work directory)."""
    from tasks.train import dataset_pairs

    key = _training_data(model)
    folder = Path(model["checkpoint"]).parents[2] / "datasets" / key.split(":", 1)[1] if key else None
    if folder is None or not (folder / "manifest.json").is_file():
        return []
    datasets = {"output": str(folder), **json.loads((folder / "manifest.json").read_text())["result"]}
    return [image for image, _ in dataset_pairs(datasets, "train") if image.is_file()]


def export_model(model: str, work_dir: str, out: str) -> dict:
    """Export ``model`` (``champion``, a train stage folder or a checkpoint in one; resolved in
    ``work_dir``) into the folder ``out``, with an int8 model calibrated on its training frames
    when they are found (:func:`training_frames`); returns model.json's content."""
    from unet.data import read_sections
    from unet.export import write_export
    from unet.recipes import Recipe

    m = resolve_model(model, work_dir)
    if m.get("onnx"):
        raise ValueError(f"{model}: already an export (it has model.json); export a train stage folder or the champion")
    recipe = Recipe.from_dict(m["recipe"])
    sidecar = {"model_key": m["key"], "train_key": m["train_key"], "source": m["source"], "threshold": THRESHOLD,
               "alignment_shift": m["shift"], "tta": "d4" if recipe.tta else "none", "tta_scales": m["tta_scales"],
               "training_data": _training_data(m), "val": m["val"],
               "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "versions": {"python": platform.python_version(),
                            **{p: version(p) for p in ("mindspore", "onnx", "onnxruntime", "numpy")}}}
    frames = [read_sections(path, recipe.sections) for path in training_frames(m)]
    return write_export(m["checkpoint"], recipe, out, sidecar, calibration_frames=frames)


@task(name="export_champion", cache_policy=NO_CACHE)
def export_champion(work_dir: str) -> str:
    """``<work_dir>/champion-export/`` for the current champion, written again only when the
    champion changed (its checkpoint's sha256 differs from the export's) or the export lacks an
    int8 model that the champion's training frames allow."""
    from unet.export import SIDECAR

    out = Path(work_dir) / CHAMPION_EXPORT
    # two runs on one work dir: the second waits, then finds the export up to date (the writers'
    # temporary files have fixed names beside the export)
    with _locked(Path(work_dir) / ".locks" / f"{CHAMPION_EXPORT}.lock"):
        champion = json.loads((Path(work_dir) / "champion.json").read_text())
        checkpoint = Path(champion["model"]["output"]) / champion["model"]["best_checkpoint"]
        current = json.loads((out / SIDECAR).read_text()) if (out / SIDECAR).is_file() else {}
        same_weights = current.get("sha256", {}).get("checkpoint") == file_digest(checkpoint)
        # an export without int8 is written again once the model's training frames are there to calibrate on
        has_int8 = bool(current.get("files", {}).get("onnx_int8"))
        if same_weights and (has_int8 or not training_frames(resolve_model("champion", work_dir))):
            get_run_logger().info("champion export up to date: %s", out)
            return str(out)
        record = export_model("champion", work_dir, str(out))
    get_run_logger().info("champion exported to %s (ONNX %s..., int8: %s)", out, record["sha256"]["onnx"][:12],
                          f"calibrated on {record['int8']['calibration_frames']} training frames"
                          if record["int8"] else "none, its training frames were not found")
    return str(out)
