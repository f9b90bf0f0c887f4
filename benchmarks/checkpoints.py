"""Native-size val scores of a training run's checkpoints: which one should the pipeline keep?

    .venv/bin/python benchmarks/checkpoints.py --train-dir WORK/train/KEY --split-dir WORK/split/KEY [--tta]

Loads ``best.ckpt`` (the epoch the training picked) and ``last.ckpt`` (the last epoch) of a train
stage folder with the recipe in its manifest, predicts the whole val frames of the split stage
folder (``val/image``, ``val/mask``) and scores them as the evaluate stage does
(:func:`unet.evaluate.native_scores`). One JSON line per checkpoint.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import common

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-dir", type=Path, required=True, help="a train stage folder (best.ckpt, last.ckpt)")
    p.add_argument("--split-dir", type=Path, required=True, help="the split stage folder of the same run")
    p.add_argument("--tta", action="store_true", help="8-fold flip/rotate test-time augmentation")
    args = p.parse_args()

    from unet.data import read_sections
    from unet.evaluate import native_scores, read_masks
    from unet.infer import load_model, predict_frame
    from unet.recipes import Recipe

    manifest = json.loads((args.train_dir / "manifest.json").read_text())
    recipe = Recipe.from_dict(manifest["inputs"]["recipe"])
    images = sorted((args.split_dir / "val" / "image").glob("*.png"))
    target = read_masks(sorted((args.split_dir / "val" / "mask").glob("*.png")))
    history = json.loads((args.train_dir / "last.json").read_text())
    for name, epoch in (("best.ckpt", history["best_epoch"]), ("last.ckpt", history["epoch"])):
        t0 = time.perf_counter()
        net = load_model(args.train_dir / name, recipe)
        prob = np.stack([predict_frame(net, read_sections(img, recipe.sections), recipe, tta=args.tta)
                         for img in images])
        s = native_scores(prob, target)
        common.emit({"benchmark": "checkpoints", "train_dir": str(args.train_dir), "checkpoint": name,
                     "epoch": epoch,
                     "tta": args.tta, "frames": len(images), "seconds": round(time.perf_counter() - t0, 1),
                     **{k: round(float(s[k]), 4) for k in ("iou", "acc", "membrane_dice", "membrane_iou", "v_rand",
                                                           "v_info", "v_rand_filled")},
                     "v_rand_threshold": s["v_rand_threshold"]})


if __name__ == "__main__":
    main()
