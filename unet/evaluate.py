"""Evaluation: native-size scores of predictions (the case's metrics as training validates are
:func:`unet.train.evaluate_case_metrics`).

``native_scores`` is what the pipeline reports for full-size predictions: the case's five
per-image metrics (cell class), dataset-level confusion scores for both classes, and the ISBI
2012 scores V_rand and V_info (best threshold).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from unet.data import read_grey
from unet.metrics import (CASE_METRICS, ConfusionCounts, case_scores, confusion_counts,
                          confusion_scores, segmentation_scores)
from unet.segment import filled_segmentation_scores


def read_masks(paths: Sequence[Path | str]) -> np.ndarray:
    """Binary masks {0, 1} [N, H, W] (1 = cell) from 0/255 PNGs."""
    return np.stack([(read_grey(p) > 127).astype(np.uint8) for p in paths])


def native_scores(cell_prob: np.ndarray, target: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Scores of probabilities [N, H, W] against binary masks [N, H, W] at native size.

    Keys: acc, iou, dice, sens, spec (the case's per-image means, prediction ``>= threshold``),
    cell_* and membrane_* (dataset-level confusion scores), balanced_accuracy, v_rand, v_info and
    the thresholds at which V_rand and V_info were best (the 4-connected components of the
    thresholded cell map, as the ISBI peer scored them), and v_rand_filled, v_info_filled with
    their thresholds (the same components grown over the membrane pixels, our post-processing:
    :mod:`unet.segment`).
    """
    if cell_prob.shape != target.shape or cell_prob.ndim != 3:
        raise ValueError(f"expected probabilities and masks of one shape [N, H, W], got "
                         f"{cell_prob.shape} and {target.shape}")
    pred = (cell_prob >= threshold).astype(np.uint8)
    per_image = [case_scores(p, t) for p, t in zip(pred, target)]
    out = {m: float(np.mean([s[m] for s in per_image])) for m in CASE_METRICS}
    counts = sum((confusion_counts(p, t) for p, t in zip(pred, target)), ConfusionCounts())
    dataset_level = confusion_scores(counts)
    out.update({k: v for k, v in dataset_level.items() if k != "acc"})
    seg = segmentation_scores(cell_prob, target)
    out.update({k: float(seg[k]) for k in ("v_rand", "v_rand_threshold", "v_info", "v_info_threshold")})
    filled = filled_segmentation_scores(cell_prob, target)
    out.update({"v_rand_filled": filled["v_rand"], "v_rand_filled_threshold": filled["v_rand_threshold"],
                "v_info_filled": filled["v_info"], "v_info_filled_threshold": filled["v_info_threshold"]})
    return out
