"""How far the labels sit from the membranes of their images, and what the alignment shift gives.

    .venv/bin/python benchmarks/alignment.py --data-dir ../shared/data/isbi2012
    .venv/bin/python benchmarks/alignment.py --data-dir ../shared/data/isbi2012 \\
        --evaluate-dir WORK/evaluate/KEY --split-dir WORK/split/KEY

Without a trained model: each labelled frame, read as a crude cell probability (Gaussian blur
sigma 1, rescaled between its 10th and 60th percentile: bright = cell), is matched to its label by
``unet.align.estimate_shift``; the per-frame shifts and the one of all frames together show whether
the annotation is off-centre (a property of the data, not of any network).

With ``--evaluate-dir`` and ``--split-dir``: the val scores of that evaluate stage's
``val/probabilities.tif`` moved by every shift of a grid (from a ``--no-align`` run: the raw
effect; from an aligned run: what is left), to see how large and how peaked the effect is. This
uses the val labels: a diagnostic, not a way to pick the shift — the pipeline estimates it on the
train frames. Also: the share of the val errors on label-edge pixels (a 3x3 neighbourhood holding
both classes).

One JSON line.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import common

import cv2
import numpy as np
import tifffile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True, help="folder with train-volume.tif, train-labels.tif")
    p.add_argument("--evaluate-dir", type=Path, help="an evaluate stage folder (val/probabilities.tif)")
    p.add_argument("--split-dir", type=Path, help="the split stage folder of the same run (val/mask/*.png)")
    args = p.parse_args()
    if (args.evaluate_dir is None) != (args.split_dir is None):
        p.error("--evaluate-dir and --split-dir go together")

    from unet.align import estimate_shift, image_as_probability, shift

    images = tifffile.imread(args.data_dir / "train-volume.tif")
    labels = (tifffile.imread(args.data_dir / "train-labels.tif") > 127).astype(np.uint8)
    crude = image_as_probability(images)
    t0 = time.perf_counter()
    per_frame = [estimate_shift(crude[i:i + 1], labels[i:i + 1]) for i in range(len(labels))]
    together = estimate_shift(crude, labels)
    seconds = time.perf_counter() - t0
    out = {"labels_vs_images": {
        "all_frames": {"dy": together.dy, "dx": together.dx, "mse_before": round(together.mse_before, 5),
                       "mse_after": round(together.mse_after, 5), "frames": len(labels),
                       "estimate_seconds": round(seconds, 2)},
        "per_frame_counts": {f"{dy:+.2f},{dx:+.2f}": n
                             for (dy, dx), n in Counter((a.dy, a.dx) for a in per_frame).most_common()}}}

    if args.evaluate_dir is not None:
        from unet.evaluate import read_masks
        from unet.metrics import confusion_counts, confusion_scores

        prob = tifffile.imread(args.evaluate_dir / "val" / "probabilities.tif").astype(np.float32)
        target = read_masks(sorted((args.split_dir / "val" / "mask").glob("*.png")))
        grid = [-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5]
        table = {}
        for dy in grid:
            for dx in grid:
                s = confusion_scores(confusion_counts(shift(prob, dy, dx) >= 0.5, target))
                table[f"{dy:+.2f},{dx:+.2f}"] = {"cell_iou": round(s["cell_iou"], 4),
                                                 "membrane_dice": round(s["membrane_dice"], 4)}
        out["val_scores_by_shift"] = table
        # where the errors are: pixels next to a label edge (a 3x3 neighbourhood holding both classes)
        kernel = np.ones((3, 3), np.uint8)
        edge = np.stack([cv2.dilate(t, kernel) != cv2.erode(t, kernel) for t in target.astype(np.uint8)])
        wrong = (prob >= 0.5) != (target > 0)
        out["val_errors_on_label_edges"] = round(float(wrong[edge].sum() / wrong.sum()), 3)
        out["val_label_edge_pixels"] = round(float(edge.mean()), 3)
    out["machine"] = common.machine()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
