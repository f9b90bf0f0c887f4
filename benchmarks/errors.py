"""Where a model's val errors are, and how far an ensemble or a per-frame threshold could take it.

    .venv/bin/python benchmarks/errors.py --split-dir WORK/split/KEY \\
        --evaluate-dir WORK/evaluate/KEY [--evaluate-dir WORK/evaluate/KEY2 ...] [--weights 0.6 0.4]

Reads ``val/probabilities.tif`` of one or more evaluate stage folders (several: their weighted
mean, an ensemble; the folders may come from different work dirs, e.g. a `seed` and a `fullres`
model, as long as they score the same split) and the val masks of the split stage folder. Prints
one JSON line with, at threshold 0.5:

- ``scores``: cell IoU (per-image mean, the case's) and membrane Dice (all val pixels) of each
  folder and of the ensemble;
- ``errors_by_distance``: the share of wrong pixels at each distance (px, Euclidean) to the other
  class of the ground truth (1 = a label-edge pixel), split into missed and extra membrane;
- ``per_frame``: the membrane fraction of the labels and of the prediction, and the membrane Dice,
  of each val frame;
- ``oracle_threshold``: membrane Dice when every frame gets its own best threshold of 0.30..0.70
  chosen *on its val labels* -- not a method (it reads the answers), a bound on what any
  recalibration of these probabilities could reach.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import common

import cv2
import numpy as np
import tifffile

from unet.evaluate import read_masks
from unet.metrics import case_scores, confusion_counts, confusion_scores


def membrane_dice(cell_pred: np.ndarray, cell_true: np.ndarray) -> float:
    """All-pixel membrane Dice, as the evaluate stage reports it."""
    return confusion_scores(confusion_counts(cell_pred, cell_true))["membrane_dice"]


def cell_iou(cell_prob: np.ndarray, cell_true: np.ndarray, threshold: float = 0.5) -> float:
    """The case's cell IoU: per image, then averaged."""
    return float(np.mean([case_scores(p >= threshold, t)["iou"] for p, t in zip(cell_prob, cell_true)]))


def distance_to_other_class(membrane: np.ndarray) -> np.ndarray:
    """Per pixel, its Euclidean distance (px) to the nearest pixel of the other class."""
    m = membrane.astype(np.uint8)
    inside = cv2.distanceTransform(m, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    outside = cv2.distanceTransform(1 - m, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return np.where(membrane, inside, outside)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--evaluate-dir", type=Path, action="append", required=True,
                   help="an evaluate stage folder (repeat for an ensemble)")
    p.add_argument("--split-dir", type=Path, required=True, help="the split stage folder the models were scored on")
    p.add_argument("--weights", type=float, nargs="+", help="ensemble weights, one per --evaluate-dir (default: equal)")
    args = p.parse_args()

    masks = sorted((args.split_dir / "val" / "mask").glob("*.png"))
    cell_true = read_masks(masks).astype(bool)
    probs = []
    for folder in args.evaluate_dir:
        prob = tifffile.imread(folder / "val" / "probabilities.tif").astype(np.float32)
        if prob.shape != cell_true.shape:
            raise SystemExit(f"{folder}: probabilities {prob.shape} do not match the {len(masks)} val masks")
        probs.append(prob)
    weights = args.weights or [1.0] * len(probs)
    if len(weights) != len(probs):
        raise SystemExit(f"--weights: expected {len(probs)} values (one per --evaluate-dir), got {len(weights)}")
    prob = sum(w * q for w, q in zip(weights, probs)) / sum(weights)

    membrane_true = ~cell_true
    membrane_pred = prob < 0.5
    scores = {str(f): {"cell_iou": round(cell_iou(q, cell_true), 4),
                       "membrane_dice": round(membrane_dice(q >= 0.5, cell_true), 4)}
              for f, q in zip(args.evaluate_dir, probs)}
    scores["ensemble" if len(probs) > 1 else "model"] = {
        "cell_iou": round(cell_iou(prob, cell_true), 4),
        "membrane_dice": round(membrane_dice(~membrane_pred, cell_true), 4), "weights": weights}

    wrong = membrane_pred ^ membrane_true
    distance = np.stack([distance_to_other_class(m) for m in membrane_true])
    bins = {"1": (0, 1.5), "2": (1.5, 2.5), "3": (2.5, 3.5), ">3": (3.5, np.inf)}
    total = int(wrong.sum())
    by_distance = {}
    for name, (lo, hi) in bins.items():
        near = (distance > lo) & (distance <= hi)
        by_distance[name] = {"share": round(float((wrong & near).sum() / total), 3),
                             "missed_membrane": round(float((wrong & near & membrane_true).sum() / total), 3),
                             "extra_membrane": round(float((wrong & near & ~membrane_true).sum() / total), 3)}

    per_frame = [{"frame": m.name, "membrane_fraction_labels": round(float(t.mean()), 3),
                  "membrane_fraction_predicted": round(float(q.mean()), 3),
                  "membrane_dice": round(membrane_dice(~q, ~t), 4)}
                 for m, q, t in zip(masks, membrane_pred, membrane_true)]

    thresholds = np.round(np.arange(0.30, 0.701, 0.05), 2)
    best = [max(thresholds, key=lambda th: membrane_dice(q >= th, t)) for q, t in zip(prob, cell_true)]
    oracle = np.stack([q >= th for q, th in zip(prob, best)])
    common.emit({"benchmark": "errors", "split_dir": str(args.split_dir), "frames": len(masks), "scores": scores,
                 "wrong_pixels": total, "errors_by_distance": by_distance, "per_frame": per_frame,
                 "oracle_threshold": {"thresholds": [float(t) for t in best],
                                      "membrane_dice": round(membrane_dice(oracle, cell_true), 4)}})


if __name__ == "__main__":
    main()
