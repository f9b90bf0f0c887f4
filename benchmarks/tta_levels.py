"""Test-time augmentation levels priced: for a model's export (flows/export.py; the pipeline writes
its champion's to <work>/champion-export), the val scores the evaluate stage reports at native size
(cell IoU, membrane Dice, V_rand: ``unet.evaluate.native_scores`` of the val frames, shifted by the
model's alignment) and the seconds per section through the block engine, for each TTA level x
backend x precision:

- ``none`` (1 pass), ``flips`` (4), ``d4`` (8 flips/rotations), ``flips+scales`` and ``d4+scales``
  (4 or 8 x the model's test-time scales) and ``d4-flips+scales`` (d4 at scale 1, flips at the
  others: 16 passes for three scales); the last three left out when the model has no scale but 1.0;
- ONNX Runtime fp32 and int8 (the export's), and MindSpore fp32 with ``--mindspore`` (slow: the
  training framework, capped at AVX2 here).

It prints a markdown table and the level the segmentation flow should default to: the cheapest row
within ``--tolerance`` (0.002) of the best on all three scores (issue 19).

    .venv/bin/python benchmarks/tta_levels.py --work-dir /work/runs/fullres
    .venv/bin/python benchmarks/tta_levels.py --work-dir /work/runs/smoke --levels none d4 --repeats 2
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import common
import numpy as np
from precision import SCORES, datasets_of, predict, seconds_per_section
from unet.tta import TTA_VIEWS, views_at

def passes(tta: str, scales: tuple[float, ...]) -> int:
    """Forward passes per section of a level: its views at each scale."""
    return sum(len(TTA_VIEWS[views_at(tta, s)]) for s in scales)


def levels_of(record: dict) -> dict[str, tuple[str, tuple[float, ...]]]:
    """Level name -> (TTA level, test-time scales) for the model of ``record`` (its model.json)."""
    scales = tuple(record["tta_scales"])
    levels = {name: (name, (1.0,)) for name in TTA_VIEWS}
    if scales != (1.0,):
        levels["flips+scales"] = ("flips", scales)
        levels["d4-flips+scales"] = ("d4-flips", scales)
        levels["d4+scales"] = ("d4", scales)
    return levels


def loss(row: dict, rows: list[dict]) -> float:
    """How far ``row`` falls behind the best of ``rows`` on its worst score."""
    return max(max(r[k] for r in rows) - row[k] for k in SCORES)


def cheapest_within(rows: list[dict], tolerance: float) -> tuple[dict, bool]:
    """The fastest row whose three scores are each within ``tolerance`` of the best on that score
    (the best of each score may come from different rows), and True; when no row is, the row that
    loses least on its worst score, and False."""
    good = [row for row in rows if loss(row, rows) <= tolerance]
    if good:
        return min(good, key=lambda row: row["s_per_section"]), True
    return min(rows, key=lambda row: (loss(row, rows), row["s_per_section"])), False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", required=True, help="the pipeline's work directory (its datasets and train stages)")
    p.add_argument("--export", help="the export folder (default: <work-dir>/champion-export)")
    p.add_argument("--levels", nargs="+", help="levels to run (default: all the model has)")
    p.add_argument("--mindspore", action="store_true", help="also MindSpore fp32 (slow)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--repeats", type=int, default=3, help="timed sections per row (median), after one warm-up")
    p.add_argument("--tolerance", type=float, default=0.002)
    args = p.parse_args()

    from tasks.train import dataset_pairs
    from unet.backends import OnnxPredictor, load_predictor
    from unet.blocks import Settings
    from unet.data import read_sections
    from unet.evaluate import native_scores, read_masks
    from unet.export import INT8_FILE, SIDECAR
    from unet.recipes import Recipe

    work = Path(args.work_dir).resolve()
    export = Path(args.export or work / "champion-export")
    record = json.loads((export / SIDECAR).read_text())
    recipe = Recipe.from_dict(record["recipe"])
    val = dataset_pairs(datasets_of(work, record), "val")
    frames = [read_sections(image, recipe.sections) for image, _ in val]
    masks = read_masks([mask for _, mask in val])
    levels = {k: v for k, v in levels_of(record).items() if not args.levels or k in args.levels}

    variants = {("onnxruntime", "fp32"): lambda: OnnxPredictor(export / record["files"]["onnx"], args.threads)}
    if (export / INT8_FILE).is_file():
        variants[("onnxruntime", "int8")] = lambda: OnnxPredictor(export / INT8_FILE, args.threads)
    if args.mindspore:
        checkpoint = work / "train" / record["train_key"] / "best.ckpt"
        variants[("mindspore", "fp32")] = lambda: load_predictor(checkpoint, recipe, backend="mindspore")

    rows = []
    for (backend, precision), load in variants.items():
        predictor = load()
        for level, (tta, scales) in levels.items():
            settings = Settings(recipe, tta=tta, scales=scales, shift=tuple(record["alignment_shift"]))
            probs = np.stack([predict(predictor, frame, settings) for frame in frames])
            scores = native_scores(probs, masks)
            row = {"level": level, "passes": passes(tta, scales), "backend": backend, "precision": precision,
                   **{k: round(scores[k], 4) for k in SCORES},
                   "s_per_section": round(seconds_per_section(predictor, frames, settings, args.repeats), 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)

    # the level rule within each backend x precision: the default of the segmentation flow is the
    # choice for its default variant, ONNX Runtime fp32
    choices = {}
    for variant in variants:
        same = [row for row in rows if (row["backend"], row["precision"]) == variant]
        choices[variant] = cheapest_within(same, args.tolerance)
    side = "x".join(str(s) for s in frames[0].shape[:2])
    print(f"\n{recipe.name} export {export} ({len(frames)} val frames of {side}, shift {record['alignment_shift']}, "
          f"ONNX Runtime {args.threads} threads; seconds: median of {args.repeats} sections)")
    print("| TTA level | passes | backend | precision | val cell IoU | membrane Dice | V_rand | s / section |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        mark = "**" if any(row is chosen for chosen, _ in choices.values()) else ""
        print(f"| {mark}{row['level']}{mark} | {row['passes']} | {row['backend']} | {row['precision']} | {row['iou']:.4f} | "
              f"{row['membrane_dice']:.4f} | {row['v_rand']:.4f} | {row['s_per_section']} |")
    for (backend, precision), (chosen, within) in choices.items():
        same = [row for row in rows if (row["backend"], row["precision"]) == (backend, precision)]
        rule = (f"the cheapest level within {args.tolerance} of the best on all three scores" if within else
                f"no level within {args.tolerance} of the best on all three scores; the least behind on its worst "
                f"score ({loss(chosen, same):.4f})")
        print(f"{backend} {precision}: {rule}: {chosen['level']} ({chosen['s_per_section']} s / section)")
    common.emit({"benchmark": "tta_levels", "export": str(export), "recipe": recipe.name, "threads": args.threads,
                 "rows": rows, "tolerance": args.tolerance,
                 "chosen": {f"{b} {p}": {"level": c["level"], "within_tolerance": w} for (b, p), (c, w) in choices.items()}})


if __name__ == "__main__":
    main()
