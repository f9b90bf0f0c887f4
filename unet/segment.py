"""Post-processing: from a cell-probability map to cell instances, and its ISBI 2012 scores.

The ISBI peer's segmentation is the 4-connected components of the thresholded cell map
(:func:`unet.metrics.segmentation_scores`). Its weak point is the predicted membrane itself: every
membrane pixel is label 0, and label 0 on ground-truth cell pixels counts as one more segment that
spans the whole frame. A high threshold keeps thin membrane gaps closed (no false merges) but makes
the predicted membranes thick, and that one big segment then costs as much as the merges saved.

:func:`segment_cells` with ``fill_membrane=True`` grows every component over the membrane pixels
(each membrane pixel joins its nearest component, ``skimage.segmentation.expand_labels``): the
cuts stay where the thresholded map put them and no pixel is left unassigned — the cell
instances a user would want from the map, with no boundary pixels between them.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from skimage.measure import label
from skimage.segmentation import expand_labels

from unet.metrics import (DEFAULT_THRESHOLDS, _binary, _check_thresholds, _probabilities, _same_shape,
                          v_info, v_rand)

__all__ = ["filled_segmentation_scores", "segment_cells"]


def segment_cells(cell_prob: np.ndarray, threshold: float, fill_membrane: bool = False) -> np.ndarray:
    """Cell instances of one frame ``[H, W]``: the 4-connected components of
    ``cell_prob >= threshold`` (labels 1..n, 0 = membrane); with ``fill_membrane`` grown until every
    pixel belongs to a component. A frame with no component stays all 0."""
    prob = np.asarray(cell_prob)
    if prob.ndim != 2:
        raise ValueError(f"cell_prob must be one frame [H, W], got shape {prob.shape}")
    labels = label(prob >= threshold, connectivity=1)
    if fill_membrane and labels.max() > 0:
        labels = expand_labels(labels, distance=float(sum(labels.shape)))
    return labels


def filled_segmentation_scores(
    cell_prob: np.ndarray,
    target: np.ndarray,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> dict[str, Any]:
    """V_rand and V_info of the filled segmentation (:func:`segment_cells` with
    ``fill_membrane=True``), best over ``thresholds``; the keys and the conventions (per-frame
    scores averaged, ties to the first threshold) of :func:`unet.metrics.segmentation_scores`."""
    prob = _probabilities("cell_prob", cell_prob)
    mask = _binary("target", target)
    _same_shape(("cell_prob", "target"), prob, mask)
    if prob.ndim == 2:
        prob, mask = prob[None], mask[None]
    if prob.ndim != 3:
        raise ValueError(f"cell_prob and target must have shape [N, H, W] or [H, W], got {prob.shape}")
    gts = [label(m, connectivity=1) for m in mask]
    per_threshold: dict[float, dict[str, float]] = {}
    for t in _check_thresholds(thresholds):
        preds = [segment_cells(p, t, fill_membrane=True) for p in prob]
        per_threshold[t] = {
            "v_rand": float(np.mean([v_rand(g, s) for g, s in zip(gts, preds)])),
            "v_info": float(np.mean([v_info(g, s) for g, s in zip(gts, preds)])),
        }
    ts = list(per_threshold)
    best_rand = max(ts, key=lambda t: per_threshold[t]["v_rand"])
    best_info = max(ts, key=lambda t: per_threshold[t]["v_info"])
    return {
        "v_rand": per_threshold[best_rand]["v_rand"],
        "v_rand_threshold": best_rand,
        "v_info": per_threshold[best_info]["v_info"],
        "v_info_threshold": best_info,
        "per_threshold": per_threshold,
    }
