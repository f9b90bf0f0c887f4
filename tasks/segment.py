"""The segmentation flow's stages: apply a trained model to a new volume, block by block.

Resume needs no other state than the output itself (as daisy does it): a block writes its chunks
of probabilities and mask, then a marker ``.segment/blocks/<block>``; a section's cell instances
are written, then ``.segment/sections/<z>.json``; the whole output gets ``.segment/complete.json``
last. A rerun skips what is marked, so a run killed at any moment ends, once rerun, bit-identical
to an uninterrupted one. ``.segment/plan.json`` records what the output is made of (input digest,
model key, inference settings); another input, model or setting into the same output is refused
unless ``overwrite``.

Output layout: ``--format zarr`` (default), OUT is an OME-Zarr (image ``0``: cell probability;
``labels/mask``, ``labels/cells``) with ``preview.png`` inside; ``--format tiff``, OUT is a folder
with ``probabilities.tif``, ``masks.tif``, ``cells.tif`` and ``preview.png`` (the blocks are
written into ``.segment/work.zarr`` first, removed when the TIFFs are written).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.stage import _locked, file_digest

STATE = ".segment"
THRESHOLD = 0.5        # the pipeline's mask threshold (tasks/predict.py, unet.infer.predict_files)
FILL_DISTANCE = 32     # cells grow over at most this many membrane pixels (unet.blocks.fill_tile)
PREVIEW_SIDE = 768     # preview.png shows sections subsampled to at most this many pixels a side
CHUNK_ROWS = 512       # rows read at a time for the preview
IDENTITY = ("input_digest", "model_key", "backend", "settings", "threshold", "fill_distance", "format")


class OutputMismatch(ValueError):
    """The output folder holds a segmentation of another input, model or settings."""


# ---- the model -----------------------------------------------------------------------------------

def _evaluation_of(work_dir: Path, train_key: str) -> dict | None:
    """The newest finished evaluate stage of the model ``train_key`` in ``work_dir``: its manifest."""
    found = []
    for manifest in (work_dir / "evaluate").glob("*/manifest.json"):
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        if data.get("inputs", {}).get("model") == f"train:{train_key}":
            found.append((data.get("inputs", {}).get("align", False), data.get("created", ""), data))
    return max(found, key=lambda t: t[:2])[2] if found else None


def resolve_model(model: str, work_dir: str, precision: str = "fp32", backend: str = "onnxruntime") -> dict[str, Any]:
    """``champion`` (the champion of ``work_dir``), a train stage folder, a checkpoint inside one, or
    an export folder (flows/export.py) -> {"checkpoint", "key", "train_key", "recipe", "shift",
    "tta_scales", "source", "val", "precision", "precision_reason"} (and "onnx", "export" for an
    export). The alignment shift and test-time scales are those of the model's evaluation in
    ``work_dir`` (none if it has none). ``precision`` int8 resolves to an export's int8 model: the
    export folder's, or for a checkpoint the champion export of ``work_dir`` when it holds that
    checkpoint; ``auto`` to int8 where that export's int8 check kept the val scores
    (:func:`tasks.export.int8_check`) and ``backend`` is onnxruntime, else to fp32.
    FileNotFoundError / ValueError with one line saying what to do."""
    from unet.backends import check_precision

    check_precision(precision, backend, auto=True)
    found = _resolve_model(model, work_dir, "fp32")
    export = _export_of(found) if precision != "fp32" else None  # reads model.json, hashes the checkpoint
    reason = "asked for"
    if precision == "auto":
        precision, reason = _auto_precision(export, backend)
    if precision == "int8":
        if export is None:
            raise ValueError(f"{model}: int8 needs an export of this model, calibrated on its training frames: "
                             "python flows/export.py --model ... --out DIR, then --model DIR")
        source = found["source"] if found.get("onnx") else f"{found['source']} (int8: {export[0]})"
        found = {**_exported_model(export[0], precision), "source": source}
    return {**found, "precision": precision, "precision_reason": reason}


def _export_of(found: dict) -> tuple[Path, dict] | None:
    """The export folder of a resolved model and its model.json: its own, or for a checkpoint the
    champion export of its work directory when that holds the same weights."""
    from unet.export import SIDECAR

    if found.get("export"):
        return Path(found["export"]), json.loads((Path(found["export"]) / SIDECAR).read_text())
    export = Path(found["checkpoint"]).parents[2] / "champion-export"
    record = json.loads((export / SIDECAR).read_text()) if (export / SIDECAR).is_file() else {}
    same = record.get("sha256", {}).get("checkpoint") == file_digest(Path(found["checkpoint"]))
    return (export, record) if same else None


def _auto_precision(export: tuple[Path, dict] | None, backend: str) -> tuple[str, str]:
    """The precision ``auto`` means for a model with ``export`` (:func:`_export_of`), and why in a
    few words."""
    if backend != "onnxruntime":
        return "fp32", f"auto: int8 runs on onnxruntime only, not {backend}"
    check = ((export[1] if export else {}).get("int8") or {}).get("check")
    if not check:
        return "fp32", ("auto: no checked int8 model for it (flows/export.py writes one where the model's "
                        "val frames are found)")
    loss = check["loss"]
    if check["keeps_scores"]:
        worst = (f"largest loss {loss['value']:.4f} of {loss['score']}" if loss["value"] > 0 else
                 "none below fp32's")
        return "int8", (f"auto: int8 kept the val scores on {check['frames']} frames ({worst}; tolerance "
                        f"{check['tolerance']})")
    return "fp32", (f"auto: int8 lost {loss['value']:.4f} of val {loss['score']} on {check['frames']} frames "
                    f"(tolerance {check['tolerance']})")


def _resolve_model(model: str, work_dir: str, precision: str) -> dict[str, Any]:
    work = Path(work_dir).expanduser().resolve()
    if model == "champion":
        champion = work / "champion.json"
        if not champion.is_file():
            raise FileNotFoundError(f"{champion}: no champion model in {work}; train one first (make run) or "
                                    "pass --model with a train stage folder or checkpoint")
        record = json.loads(champion.read_text())
        folder = Path(record["model"]["output"])
        checkpoint = folder / record["model"]["best_checkpoint"]
        recipe = record["recipe"]
        source = f"champion of {work}"
    else:
        path = Path(model).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(f"{path}: model not found (expected 'champion', a train stage folder, a .ckpt "
                                    "in one, or an export folder of flows/export.py)")
        if (path / "model.json").is_file():
            return _exported_model(path, precision)
        folder = path if path.is_dir() else path.parent
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            raise ValueError(f"{path}: not a train stage folder (no manifest.json beside the checkpoint to say its "
                             "recipe); pass a folder under <work-dir>/train/")
        data = json.loads(manifest.read_text())
        if data.get("stage") != "train":
            raise ValueError(f"{folder}: a {data.get('stage')!r} stage folder, expected a train stage folder")
        recipe = data["inputs"]["recipe"]
        checkpoint = path if path.is_file() else folder / data["result"]["best_checkpoint"]
        work = folder.parent.parent
        source = str(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: checkpoint not found; train first (make run) or pass --model")
    evaluation = _evaluation_of(work, folder.name)
    metrics = (evaluation or {}).get("result", {}).get("metrics", {})
    alignment = metrics.get("alignment") or {}
    applied = bool(evaluation and evaluation["inputs"].get("align", False))
    val = metrics.get("val_native") or {}
    return {"checkpoint": str(checkpoint), "key": file_digest(checkpoint)[:16], "train_key": folder.name,
            "recipe": recipe, "source": source,
            "shift": [float(alignment.get("dy", 0.0)), float(alignment.get("dx", 0.0))] if applied else [0.0, 0.0],
            "tta_scales": (evaluation or {}).get("inputs", {}).get("tta_scales") or [1.0],
            "val": {k: val[k] for k in ("iou", "membrane_dice", "v_rand") if k in val}}


def _exported_model(folder: Path, precision: str = "fp32") -> dict[str, Any]:
    """An export folder (flows/export.py: model.onnx, model.int8.onnx + model.json) as
    resolve_model's dict: ONNX Runtime only, no checkpoint and no MindSpore needed."""
    from unet.export import SIDECAR, model_file

    record = json.loads((folder / SIDECAR).read_text())
    onnx_path = model_file(folder, precision)
    return {"checkpoint": None, "onnx": str(onnx_path), "export": str(folder), "key": file_digest(onnx_path)[:16],
            "train_key": record.get("train_key"), "recipe": record["recipe"], "source": str(folder),
            "shift": record["alignment_shift"], "tta_scales": record["tta_scales"], "val": record.get("val", {}),
            "precision": precision}


@functools.lru_cache(maxsize=2)
def _predictor(checkpoint: str | None, recipe_json: str, backend: str, threads: int, onnx: str | None = None):
    """The model, loaded once per process (each Dask worker process loads it once): an exported
    ONNX model, or a checkpoint on ``backend``."""
    from unet.backends import OnnxPredictor, load_predictor
    from unet.recipes import Recipe

    if onnx is not None:
        return OnnxPredictor(Path(onnx), threads)
    return load_predictor(checkpoint, Recipe.from_dict(json.loads(recipe_json)), backend, threads)


# ---- the plan ------------------------------------------------------------------------------------

def state_dir(plan: dict) -> Path:
    return Path(plan["output"]) / STATE


def _settings(plan: dict):
    from unet.blocks import Settings
    from unet.recipes import Recipe

    s = plan["settings"]
    return Settings(Recipe.from_dict(plan["model"]["recipe"]), tta=s["tta"], scales=tuple(s["scales"]),
                    shift=tuple(s["shift"]), block=s["block"], halo=s["halo"])


def blocks_of(plan: dict):
    from unet.blocks import grid

    shape = tuple(plan["shape"])
    return grid(shape, _settings(plan).tile(shape[1:]))


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _is_ours(out: Path) -> bool:
    return (out / STATE / "plan.json").is_file()


def _check_output(out: Path, plan: dict, overwrite: bool) -> dict | None:
    """The existing plan of ``out`` if it is the same segmentation; raises OutputMismatch for another
    one (unless ``overwrite``, which removes it); ValueError for a path that is no output of ours."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: output exists and is a file; expected a folder (or a new path)")
    if not out.exists() or not any(out.iterdir()):
        return None
    if not _is_ours(out):
        raise ValueError(f"{out}: output folder exists and is not a segmentation of this tool; choose another "
                         "--output (nothing was changed)")
    existing = json.loads((out / STATE / "plan.json").read_text())
    changed = [k for k in IDENTITY if existing.get(k) != plan.get(k)]
    if not changed:
        return existing
    if not overwrite:
        names = {"model_key": "model", "input_digest": "input"}
        what = []
        for k in changed:
            if k == "settings":
                what += [f"{s} ({existing[k].get(s)}, now {plan[k][s]})" for s in plan[k]
                         if existing[k].get(s) != plan[k][s]]
            else:
                what.append(names.get(k, f"{k} ({existing.get(k)}, now {plan.get(k)})"))
        raise OutputMismatch(f"{out}: holds a segmentation with another {', '.join(what)}; pass --overwrite to "
                             "replace it, or choose another --output")
    shutil.rmtree(out)
    return None


def _create(out: Path, plan: dict, model: dict) -> None:
    """A new output: the store, the per-tile label scratch, then plan.json (from then on it is ours)."""
    import zarr

    from unet.volume_io import create_output

    out.mkdir(parents=True, exist_ok=True)
    attributes = {k: plan[k] for k in ("input", "input_digest", "model_key", "backend", "settings",
                                       "threshold", "fill_distance")}
    attributes.update(model_source=model["source"], checkpoint=model["checkpoint"] or model.get("onnx"),
                      recipe=model["recipe"],
                      software="unet-isbi flows/segment.py")
    create_output(Path(plan["store"]), tuple(plan["shape"]), tuple(plan["chunks"]), attributes)
    zarr.open_array(str(state_dir(plan) / "local.zarr"), mode="w", shape=tuple(plan["shape"]),
                    chunks=tuple(plan["chunks"]), dtype="uint32", fill_value=0)  # per-tile labels
    _write_json(state_dir(plan) / "plan.json", plan)  # last: the output is ours from here on


@task(name="plan_segmentation", cache_policy=NO_CACHE)
def plan_segmentation(input: str, output: str, format: str, model: dict, backend: str, threads: int, tta: str,
                      tta_scales: list[float], block: int, halo: int | None, overwrite: bool) -> dict:
    """Open and scan the input, decide the blocks, create (or check) the output; returns the plan."""
    from unet.blocks import Settings, chunk_shape
    from unet.recipes import Recipe
    from unet.volume_io import content_digest, open_volume, scan

    logger = get_run_logger()
    t0 = time.perf_counter()
    volume = scan(open_volume(input))
    digest = content_digest(volume)

    settings = Settings(Recipe.from_dict(model["recipe"]), tta=tta, scales=tuple(tta_scales),
                        shift=tuple(model["shift"]), block=block, halo=halo)
    out = Path(output).expanduser().resolve()
    plan = {"input": str(Path(input).resolve()), "input_kind": volume.kind, "input_dtype": str(volume.dtype),
            **volume.settings(), "shape": list(volume.shape), "input_digest": digest,
            "model_key": model["key"], "model": model, "backend": backend, "threads": threads,
            "settings": settings.to_dict(),
            "threshold": THRESHOLD, "fill_distance": FILL_DISTANCE, "format": format, "output": str(out),
            "store": str(out if format == "zarr" else out / STATE / "work.zarr"),
            "chunks": list(chunk_shape(settings, volume.shape[1:]))}
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(output_lock(plan)):  # two runs into one new output: one creates it
        existing = _check_output(out, plan, overwrite)
        if existing is None:
            _create(out, plan, model)
    plan["blocks"] = len(blocks_of(plan))
    plan["complete"] = (state_dir(plan) / "complete.json").is_file()
    logger.info("input %s: %s %s, %d sections of %dx%d (%s); digest %s... in %.1f s", input, volume.kind,
                volume.dtype, *volume.shape, volume.conversion if volume.conversion != "none" else "uint8",
                digest[:12], time.perf_counter() - t0)
    return plan


def output_lock(plan: dict) -> Path:
    """The output's lock, beside it. Exclusive while a run creates or finishes the output, shared
    while it writes blocks and sections: a second run into the same output (another user, the same
    arguments) never writes into scratch arrays that the first run's finish has removed, and finds
    the output complete instead."""
    out = Path(plan["output"])
    return out.parent / f".{out.name}.lock"


def _complete(plan: dict) -> bool:
    return (state_dir(plan) / "complete.json").is_file()


def blocks_to_do(plan: dict) -> list[int]:
    done = state_dir(plan) / "blocks"
    return [b.index for b in blocks_of(plan) if not (done / b.name).is_file()]


def sections_to_do(plan: dict) -> list[int]:
    done = state_dir(plan) / "sections"
    return [z for z in range(plan["shape"][0]) if not (done / f"{z:05d}.json").is_file()]


# ---- the work ------------------------------------------------------------------------------------

@task(name="predict_blocks", cache_policy=NO_CACHE, retries=0)
def predict_blocks(plan: dict, indices: list[int]) -> dict:
    """Predict the blocks ``indices``: write probabilities and mask, then mark each done (nothing
    when another run has completed the output meanwhile)."""
    with _locked(output_lock(plan), shared=True):
        return {"blocks": 0, "complete": True} if _complete(plan) else _predict_blocks(plan, indices)


def _predict_blocks(plan: dict, indices: list[int]) -> dict:
    from unet.blocks import predict_block
    from unet.volume_io import open_volume, output_arrays

    t0 = time.perf_counter()
    blocks = blocks_of(plan)
    settings = _settings(plan)
    volume = open_volume(plan["input"], plan["conversion"], plan["colour"])
    predictor = _predictor(plan["model"]["checkpoint"], json.dumps(plan["model"]["recipe"], sort_keys=True),
                           plan["backend"], plan["threads"], plan["model"].get("onnx"))
    arrays = output_arrays(Path(plan["store"]))
    marks = state_dir(plan) / "blocks"
    marks.mkdir(parents=True, exist_ok=True)
    shape = tuple(plan["shape"])
    for i in indices:
        b = blocks[i]
        if (marks / b.name).is_file():
            continue
        prob = predict_block(predictor, volume.read, shape, b, settings)
        arrays["prob"][b.z, b.y0:b.y1, b.x0:b.x1] = prob
        arrays["mask"][b.z, b.y0:b.y1, b.x0:b.x1] = np.where(prob >= plan["threshold"], 255, 0).astype(np.uint8)
        tmp = marks / f".{b.name}.tmp"
        tmp.write_text(json.dumps({"pid": os.getpid(), "seconds": round(time.perf_counter() - t0, 3)}))
        os.replace(tmp, marks / b.name)  # done only once its chunks are written
    return {"blocks": len(indices), "seconds": time.perf_counter() - t0, "pid": os.getpid()}


@task(name="label_sections", cache_policy=NO_CACHE)
def label_sections(plan: dict, sections: list[int]) -> dict:
    """Cell instances of each section in ``sections``, tile by tile (storage chunks), merged across
    tile edges; then each section is marked done with its cell count (nothing when another run has
    completed the output meanwhile)."""
    with _locked(output_lock(plan), shared=True):
        return {"sections": 0, "complete": True} if _complete(plan) else _label_sections(plan, sections)


def _label_sections(plan: dict, sections: list[int]) -> dict:
    import zarr

    from unet.blocks import Block, fill_tile, grid, label_tile, merge_tiles, tile_edges
    from unet.volume_io import output_arrays

    t0 = time.perf_counter()
    arrays = output_arrays(Path(plan["store"]))
    scratch = zarr.open_array(str(state_dir(plan) / "local.zarr"), mode="r+")
    _, h, w = plan["shape"]
    tiles = grid((1, h, w), tuple(plan["chunks"][1:]))
    distance = plan["fill_distance"]
    counts = {}
    for z in sections:
        firsts = []
        for t in tiles:
            local = label_tile(np.asarray(arrays["mask"][z, t.y0:t.y1, t.x0:t.x1]) > 0, t.y0, t.x0, w)
            scratch[z, t.y0:t.y1, t.x0:t.x1] = local.labels
            firsts.append(local.first)

        def edges():
            for a, b, side in tile_edges(tiles):
                ta, tb = tiles[a], tiles[b]
                if side == "below":
                    yield a, b, scratch[z, ta.y1 - 1, ta.x0:ta.x1], scratch[z, tb.y0, tb.x0:tb.x1]
                else:
                    yield a, b, scratch[z, ta.y0:ta.y1, ta.x1 - 1], scratch[z, tb.y0:tb.y1, tb.x0]

        luts = merge_tiles(tiles, firsts, edges())
        count = int(max((int(lut.max()) for lut in luts), default=0))
        for t in tiles:
            region = Block(0, z, max(t.y0 - distance, 0), min(t.y1 + distance, h),
                           max(t.x0 - distance, 0), min(t.x1 + distance, w))
            labels = np.zeros((region.y1 - region.y0, region.x1 - region.x0), np.uint32)
            for u, lut in zip(tiles, luts):  # the merged ids of every tile the region overlaps
                y0, y1 = max(u.y0, region.y0), min(u.y1, region.y1)
                x0, x1 = max(u.x0, region.x0), min(u.x1, region.x1)
                if y0 < y1 and x0 < x1:
                    labels[y0 - region.y0:y1 - region.y0, x0 - region.x0:x1 - region.x0] = \
                        lut[np.asarray(scratch[z, y0:y1, x0:x1])]
            core = (t.y0 - region.y0, t.y1 - region.y0, t.x0 - region.x0, t.x1 - region.x0)
            arrays["cells"][z, t.y0:t.y1, t.x0:t.x1] = fill_tile(labels, core, distance)
        _write_json(state_dir(plan) / "sections" / f"{z:05d}.json", {"cells": count})
        counts[z] = count
    return {"sections": len(sections), "seconds": time.perf_counter() - t0, "cells": counts}


@task(name="finish_segmentation", cache_policy=NO_CACHE)
def finish_segmentation(plan: dict, seconds: float) -> dict:
    """Preview, TIFF export (``format`` tiff), the summary; ``complete.json`` last, then the scratch
    arrays are removed. Another run that completed the output meanwhile: its summary."""
    with _locked(output_lock(plan)):
        return completed_summary(plan) if _complete(plan) else _finish_segmentation(plan, seconds)


def _finish_segmentation(plan: dict, seconds: float) -> dict:
    from unet.viz import plot_segmentation
    from unet.volume_io import open_volume, output_arrays, write_tiff

    logger = get_run_logger()
    out, state = Path(plan["output"]), state_dir(plan)
    arrays = output_arrays(Path(plan["store"]), mode="r")
    counts = [json.loads((state / "sections" / f"{z:05d}.json").read_text())["cells"]
              for z in range(plan["shape"][0])]
    z_count = plan["shape"][0]
    shown = sorted({0, z_count // 2, z_count - 1})
    volume = open_volume(plan["input"], plan["conversion"], plan["colour"])
    _, h, w = plan["shape"]
    step = max(1, -(-max(h, w) // PREVIEW_SIDE))  # sections shown at most PREVIEW_SIDE pixels a side

    def thumbnail(read, z: int) -> np.ndarray:
        """Every step-th pixel of section z, read in bands (never the whole section in memory)."""
        band = step * max(1, CHUNK_ROWS // step)
        return np.concatenate([read(z, y, min(y + band, h))[:, ::step] for y in range(0, h, band)])[::step]

    def stored(key: str):
        return lambda z, y0, y1: arrays[key][z, y0:y1, :]

    plot_segmentation([thumbnail(lambda z, y0, y1: volume.read(z, y0, y1, 0, w), z) for z in shown],
                      [thumbnail(stored("prob"), z) for z in shown], [thumbnail(stored("cells"), z) for z in shown],
                      [f"section {z} ({h} x {w}{f', every {step}th pixel' if step > 1 else ''})" for z in shown],
                      out / "preview.png", cell_counts=[counts[z] for z in shown])
    files = {"preview": str(out / "preview.png")}
    if plan["format"] == "tiff":
        for name, key, dtype in (("probabilities.tif", "prob", "float32"), ("masks.tif", "mask", "uint8"),
                                 ("cells.tif", "cells", "uint32")):
            write_tiff(out / name, arrays[key], dtype)
            files[key] = str(out / name)
        logger.info("wrote %s", ", ".join(files.values()))
    else:
        files.update(prob=f"{out}/0", mask=f"{out}/labels/mask/0", cells=f"{out}/labels/cells/0")
    summary = {"input": plan["input"], "output": str(out), "format": plan["format"], "shape": plan["shape"],
               "blocks": plan["blocks"], "seconds": round(seconds, 2),
               "sections_per_s": round(z_count / seconds, 3) if seconds > 0 else None,
               "cells": {"total": int(sum(counts)), "per_section_mean": round(float(np.mean(counts)), 1),
                         "per_section_min": int(min(counts)), "per_section_max": int(max(counts))},
               "model": plan["model"]["source"], "model_key": plan["model_key"], "backend": plan["backend"],
               "precision": plan["model"].get("precision", "fp32"),
               "precision_reason": plan["model"].get("precision_reason", "asked for"),
               "settings": plan["settings"],
               "threshold": plan["threshold"], "files": files,
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_json(state / "complete.json", summary)
    for scratch in ("local.zarr", "work.zarr") if plan["format"] == "tiff" else ("local.zarr",):
        shutil.rmtree(state / scratch, ignore_errors=True)
    return summary


def completed_summary(plan: dict) -> dict:
    return json.loads((state_dir(plan) / "complete.json").read_text())


def summary_markdown(summary: dict, state: str) -> str:
    z, h, w = summary["shape"]
    cells = summary["cells"]
    s = summary["settings"]
    rows = [("output", f"`{summary['output']}` ({summary['format']})"), ("input", f"`{summary['input']}`"),
            ("volume", f"{z} sections of {h} x {w}"), ("blocks", f"{summary['blocks']} (block {s['block']}, "
                                                                 f"halo {s['halo']})"),
            ("seconds", summary["seconds"]), ("sections/s", summary["sections_per_s"]),
            ("cells", f"{cells['total']} (per section {cells['per_section_min']}..{cells['per_section_max']}, "
                      f"mean {cells['per_section_mean']})"),
            ("model", f"{summary['model']} (key {summary['model_key']})"),
            ("inference", f"{summary.get('backend', 'mindspore')} {summary.get('precision', 'fp32')} "
                          f"({summary.get('precision_reason', 'asked for')}), TTA {s['tta']}, "
                          f"scales {s['scales']}, "
                          f"shift {s['shift']}, threshold {summary['threshold']}"),
            ("state", state)]
    return "\n".join([f"# Segmentation of `{Path(summary['input']).name}`", "", "| | |", "|---|---|",
                      *[f"| {k} | {v} |" for k, v in rows], "",
                      f"Open it in napari: `napari --plugin napari-ome-zarr {summary['output']}`"
                      if summary["format"] == "zarr" else f"Files: {', '.join(summary['files'].values())}"])
