"""int8 against fp32 on ONNX Runtime, for a model's export (flows/export.py; the pipeline writes its
champion's to <work>/champion-export): seconds per 512x512 section through the block engine, and
the val scores the evaluate stage reports at native size (cell IoU, membrane Dice, V_rand:
``unet.evaluate.native_scores`` of the val frames predicted with the model's TTA, test-time scales
and alignment shift).

    .venv/bin/python benchmarks/precision.py --work-dir /work/runs/smoke
    .venv/bin/python benchmarks/precision.py --work-dir W --calibration minmax entropy percentile

``--calibration`` quantizes the export again with each method (into a temporary folder, on the same
training frames as the export) and scores each; without it, the export's own int8 model is scored.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import common

import numpy as np
from unet.blocks import predict_array as predict  # noqa: E402  what segment computes for a section

from unet.evaluate import KEPT_SCORES as SCORES  # noqa: E402  cell IoU, membrane Dice, V_rand


def datasets_of(work: Path, record: dict) -> dict:
    """The datasets stage the exported model was trained on, as the train stage received it."""
    folder = work / "datasets" / record["training_data"].split(":", 1)[1]
    return {"output": str(folder), **json.loads((folder / "manifest.json").read_text())["result"]}


def seconds_per_section(predictor, frames: list[np.ndarray], settings, repeats: int) -> float:
    predict(predictor, frames[0], settings)  # warm-up: ONNX Runtime plans its memory on the first run
    times = []
    for frame in frames[:repeats]:
        t0 = time.perf_counter()
        predict(predictor, frame, settings)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", required=True, help="the pipeline's work directory (its datasets stage)")
    p.add_argument("--export", help="the export folder (default: <work-dir>/champion-export)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--repeats", type=int, default=3, help="timed sections (median), after one warm-up")
    p.add_argument("--calibration", nargs="+", choices=["minmax", "entropy", "percentile"],
                   help="quantize again with each calibration method and score each")
    args = p.parse_args()

    from tasks.train import dataset_pairs
    from unet.backends import OnnxPredictor
    from unet.blocks import Settings
    from unet.data import read_sections
    from unet.evaluate import native_scores, read_masks
    from unet.export import INT8_FILE, SIDECAR, network_inputs, quantize_int8
    from unet.recipes import Recipe

    work = Path(args.work_dir).resolve()
    export = Path(args.export or work / "champion-export")
    record = json.loads((export / SIDECAR).read_text())
    recipe = Recipe.from_dict(record["recipe"])
    datasets = datasets_of(work, record)
    val = dataset_pairs(datasets, "val")
    frames = [read_sections(image, recipe.sections) for image, _ in val]
    masks = read_masks([mask for _, mask in val])
    model_settings = Settings(recipe, tta=record["tta"], scales=tuple(record["tta_scales"]),
                              shift=tuple(record["alignment_shift"]))
    plain = Settings(recipe)  # one forward pass per section: no TTA, scale 1, no shift

    variants = {"fp32": export / record["files"]["onnx"]}
    tmp = Path(tempfile.mkdtemp())
    if args.calibration:
        train = [read_sections(image, recipe.sections) for image, _ in dataset_pairs(datasets, "train")]
        inputs = [network_inputs(frame, recipe) for frame in train]
        for method in args.calibration:
            t0 = time.perf_counter()
            quantize_int8(export / "model.onnx", tmp / f"{method}.onnx", inputs, method)
            print(f"int8 {method}: quantized in {time.perf_counter() - t0:.1f} s on {len(inputs)} training frames",
                  flush=True)
            variants[f"int8 {method}"] = tmp / f"{method}.onnx"
    else:
        variants[f"int8 {record['int8']['calibration']}"] = export / INT8_FILE

    rows, reference = [], None
    for name, path in variants.items():
        predictor = OnnxPredictor(path, args.threads)
        probs = np.stack([predict(predictor, frame, model_settings) for frame in frames])
        scores = native_scores(probs, masks)
        row = {"precision": name, **{k: round(scores[k], 4) for k in SCORES},
               "v_rand_threshold": scores["v_rand_threshold"],
               "s_per_section_model": round(seconds_per_section(predictor, frames, model_settings, args.repeats), 3),
               "s_per_section_plain": round(seconds_per_section(predictor, frames, plain, args.repeats), 3)}
        if reference is None:
            reference = probs
        else:
            diff = np.abs(probs - reference)
            row.update(max_abs_diff=round(float(diff.max()), 4), mean_abs_diff=round(float(diff.mean()), 5),
                       mask_pixels_flipped=round(float(np.mean((probs >= 0.5) != (reference >= 0.5))), 5))
        rows.append(row)
        print(json.dumps(row), flush=True)

    fp32 = rows[0]
    print(f"\n{record['recipe']['name']} export {export} ({len(frames)} val frames, TTA {record['tta']}, "
          f"scales {record['tta_scales']}, shift {record['alignment_shift']}; {args.threads} threads)")
    print("| precision | val cell IoU | membrane Dice | V_rand | s / 512² section (model's TTA) | s / section (1 pass) |")
    print("|---|---|---|---|---|---|")
    evaluated = record.get("val") or {}
    if evaluated:
        print(f"| evaluate stage (MindSpore fp32) | {evaluated['iou']:.4f} | {evaluated['membrane_dice']:.4f} | "
              f"{evaluated['v_rand']:.4f} | | |")
    for row in rows:
        losses = "" if row is fp32 else " (" + ", ".join(f"{fp32[k] - row[k]:+.4f}" for k in SCORES) + " lost)"
        print(f"| {row['precision']}{losses} | {row['iou']:.4f} | {row['membrane_dice']:.4f} | {row['v_rand']:.4f} | "
              f"{row['s_per_section_model']} | {row['s_per_section_plain']} |")
    common.emit({"benchmark": "precision", "export": str(export), "recipe": record["recipe"]["name"],
                 "threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
