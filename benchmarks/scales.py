"""Test-time scales: val scores of a model's predictions at each scale and of every mean of them.

    .venv/bin/python benchmarks/scales.py --train-dir WORK/train/KEY --split-dir WORK/split/KEY \
        [--scales 0.875 1 1.125] [--shift DY DX]

Loads ``best.ckpt`` of a train stage folder with the recipe in its manifest, predicts the whole
val frames of the split stage folder at each scale (``unet.infer.predict_frame(..., scales=(s,))``,
with the recipe's flip/rotate TTA), shifts the probabilities by ``--shift`` (pass the evaluate
stage's alignment from its metrics.json; default none) and scores them as one confusion matrix
over all val pixels (cell IoU, membrane Dice: ``unet.metrics.confusion_scores``). Then every
combination of two or more scales, averaged as the pipeline's ``--tta-scales`` does. One JSON line
per scale and per combination.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import common

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-dir", type=Path, required=True, help="a train stage folder (best.ckpt)")
    p.add_argument("--split-dir", type=Path, required=True, help="the split stage folder of the same run")
    p.add_argument("--scales", type=float, nargs="+", default=[0.875, 1.0, 1.125], help="test-time scales")
    p.add_argument("--shift", type=float, nargs=2, default=[0.0, 0.0], metavar=("DY", "DX"),
                   help="shift of the probabilities before scoring (the evaluate stage's alignment)")
    args = p.parse_args()

    from unet.align import shift
    from unet.data import read_sections
    from unet.evaluate import read_masks
    from unet.infer import load_model, predict_frame
    from unet.metrics import confusion_counts, confusion_scores
    from unet.recipes import Recipe

    manifest = json.loads((args.train_dir / "manifest.json").read_text())
    recipe = Recipe.from_dict(manifest["inputs"]["recipe"])
    images = sorted((args.split_dir / "val" / "image").glob("*.png"))
    target = read_masks(sorted((args.split_dir / "val" / "mask").glob("*.png")))
    net = load_model(args.train_dir / "best.ckpt", recipe)

    def scores(prob: np.ndarray) -> dict:
        s = confusion_scores(confusion_counts(prob >= 0.5, target))
        return {"cell_iou": round(float(s["cell_iou"]), 4), "membrane_dice": round(float(s["membrane_dice"]), 4)}

    probs = {}
    for scale in args.scales:
        t0 = time.perf_counter()
        probs[scale] = np.stack([shift(predict_frame(net, read_sections(img, recipe.sections), recipe,
                                                     tta=recipe.tta, scales=(scale,)), *args.shift)
                                 for img in images])
        common.emit({"benchmark": "scales", "train_dir": str(args.train_dir), "scales": [scale],
                     "shift": args.shift, "frames": len(images), "seconds": round(time.perf_counter() - t0, 1),
                     **scores(probs[scale])})
    for k in range(2, len(args.scales) + 1):
        for combo in itertools.combinations(args.scales, k):
            common.emit({"benchmark": "scales", "train_dir": str(args.train_dir), "scales": list(combo),
                         "shift": args.shift, **scores(np.mean([probs[s] for s in combo], axis=0))})


if __name__ == "__main__":
    main()
