"""V_rand / V_info of post-processing variants on a run's saved val probabilities.

    .venv/bin/python benchmarks/postprocess.py --evaluate-dir WORK/evaluate/KEY --split-dir WORK/split/KEY

Reads ``val/probabilities.tif`` of an evaluate stage folder and the val masks of the split stage
folder (``val/mask/*.png``), and scores each variant's best threshold of 0.1..0.9: the peer's
connected components (``strict``), the probability map smoothed (Gaussian) or opened (grey
erosion then dilation) first, small holes of the thresholded map filled, and the components grown
over the membrane pixels (``filled``, :mod:`unet.segment`, what the evaluate stage reports as
``v_rand_filled``). One JSON line: per variant its V_rand, V_info and thresholds, and the strict and
filled V_rand at every threshold.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import common

import cv2
import numpy as np
import tifffile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--evaluate-dir", type=Path, required=True, help="an evaluate stage folder")
    p.add_argument("--split-dir", type=Path, required=True, help="the split stage folder of the same run")
    args = p.parse_args()

    from skimage.measure import label
    from skimage.morphology import remove_small_holes

    from unet.evaluate import read_masks
    from unet.metrics import segmentation_scores
    from unet.segment import filled_segmentation_scores

    prob = tifffile.imread(args.evaluate_dir / "val" / "probabilities.tif").astype(np.float32)
    masks = sorted((args.split_dir / "val" / "mask").glob("*.png"))
    target = read_masks(masks)
    if prob.shape != target.shape:
        raise SystemExit(f"{args.evaluate_dir}: probabilities {prob.shape} do not match the {len(masks)} val masks")

    def opened(k: int) -> np.ndarray:
        kernel = np.ones((k, k), np.uint8)
        return np.stack([cv2.dilate(cv2.erode(f, kernel), kernel) for f in prob])

    def holes_filled(frame: np.ndarray, t: float) -> np.ndarray:
        return label(remove_small_holes(frame >= t, 1000), connectivity=1)

    def brief(s: dict) -> dict:
        return {k: round(float(s[k]), 4) if "threshold" not in k else s[k] for k in s if k != "per_threshold"}

    strict = segmentation_scores(prob, target)
    filled = filled_segmentation_scores(prob, target)
    variants = {
        "strict": brief(strict),
        "gauss_sigma1": brief(segmentation_scores(np.stack([cv2.GaussianBlur(f, (0, 0), 1) for f in prob]), target)),
        "gauss_sigma2": brief(segmentation_scores(np.stack([cv2.GaussianBlur(f, (0, 0), 2) for f in prob]), target)),
        "open3": brief(segmentation_scores(opened(3), target)),
        "open5": brief(segmentation_scores(opened(5), target)),
        "holes_filled_1000px": brief(segmentation_scores(prob, target, segment=holes_filled)),
        "filled": brief(filled),
    }
    per_threshold = {t: {"strict": round(strict["per_threshold"][t]["v_rand"], 4),
                         "filled": round(filled["per_threshold"][t]["v_rand"], 4)} for t in strict["per_threshold"]}
    common.emit({"benchmark": "postprocess", "evaluate_dir": str(args.evaluate_dir), "frames": len(prob),
                 "variants": variants, "v_rand_per_threshold": per_threshold})


if __name__ == "__main__":
    main()
