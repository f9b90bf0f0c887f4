"""Evaluation: the case's metrics of a predictor as training validates (:func:`case_metrics`) and
native-size scores of predictions (:func:`native_scores`). No MindSpore here.

``native_scores`` is what the pipeline reports for full-size predictions: the case's five
per-image metrics (cell class), dataset-level confusion scores for both classes, and the ISBI
2012 scores V_rand and V_info (best threshold). Frames may differ in size (several volumes): every
score is computed per frame, then aggregated as for frames of one size — per-image means over the
frames, confusion counts summed over all pixels (pixel-weighted), V_rand / V_info averaged over the
frames at each threshold before the best threshold is picked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from unet.data import read_grey
from unet.metrics import (CASE_METRICS, CaseScores, ConfusionCounts, best_over_thresholds, case_scores,
                          confusion_counts, confusion_scores)
from unet.segment import plain_and_filled_scores


def read_masks(paths: Sequence[Path | str]) -> np.ndarray:
    """Binary masks {0, 1} [N, H, W] (1 = cell) from 0/255 PNGs of one size."""
    return np.stack(read_mask_frames(paths))


def read_mask_frames(paths: Sequence[Path | str]) -> list[np.ndarray]:
    """Binary masks {0, 1} [H, W] (1 = cell) from 0/255 PNGs, one per path, of any sizes."""
    return [(read_grey(p) > 127).astype(np.uint8) for p in paths]


def case_metrics(predict: Callable[[np.ndarray], np.ndarray], source: Sequence, batch_size: int) -> dict[str, float]:
    """The case's five metrics (per-image means, :class:`unet.metrics.CaseScores`) of ``predict`` on
    ``source`` (a :class:`unet.data.SegmentationSource`: network inputs and masks ``[1, H, W]``), in
    batches of ``batch_size`` as training's validation (:func:`unet.train.evaluate_case_metrics`) scores
    them. ``predict``: inputs ``[N, C, H, W]`` -> cell probabilities ``[N, H, W]`` (a predictor of
    :mod:`unet.backends`, on either backend)."""
    scores = CaseScores()
    for start in range(0, len(source), batch_size):
        batch = [source[i] for i in range(start, min(start + batch_size, len(source)))]
        probs = np.asarray(predict(np.stack([b[0] for b in batch])))
        scores.update(probs[:, None], np.stack([b[1] for b in batch]))
    return scores.eval()


def _frames(name: str, frames: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    out = [np.asarray(f) for f in frames]
    if not out or any(f.ndim != 2 for f in out):
        raise ValueError(f"expected {name} as frames [N, H, W] or a list of [H, W], got "
                         f"{[f.shape for f in out][:4]}")
    return out


def _mean_over_frames(score: Callable[[np.ndarray, np.ndarray], Sequence[dict[str, Any]]], probs: list[np.ndarray],
                      masks: list[np.ndarray]) -> list[dict[str, Any]]:
    """``score`` (:func:`unet.segment.plain_and_filled_scores`: for each segmentation, frame means per
    threshold and the best threshold) of frames of any sizes: frames of one size are scored as one
    stack, as ever; otherwise each size's stack, and the per-threshold means are combined weighted by
    the number of frames (the mean over all frames) before the best threshold is picked (ties: the first)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(probs):
        groups.setdefault(p.shape, []).append(i)
    if len(groups) == 1:
        return list(score(np.stack(probs), np.stack(masks)))
    parts = [(len(ix), score(np.stack([probs[i] for i in ix]), np.stack([masks[i] for i in ix])))
             for ix in groups.values()]
    combined = []
    for k in range(len(parts[0][1])):
        thresholds = list(parts[0][1][k]["per_threshold"])
        combined.append(best_over_thresholds(
            {t: {m: sum(n * part[k]["per_threshold"][t][m] for n, part in parts) / len(probs)
                 for m in ("v_rand", "v_info")} for t in thresholds}))
    return combined


def native_scores(cell_prob: np.ndarray | Sequence[np.ndarray], target: np.ndarray | Sequence[np.ndarray],
                  threshold: float = 0.5) -> dict[str, float]:
    """Scores of probabilities against binary masks at native size: [N, H, W] stacks, or lists of
    frames [H_i, W_i] of any sizes (each probability frame the size of its mask).

    Keys: acc, iou, dice, sens, spec (the case's per-image means, prediction ``>= threshold``),
    cell_* and membrane_* (dataset-level confusion scores), balanced_accuracy, v_rand, v_info and
    the thresholds at which V_rand and V_info were best (the 4-connected components of the
    thresholded cell map, as the ISBI peer scored them), and v_rand_filled, v_info_filled with
    their thresholds (the same components grown over the membrane pixels, our post-processing:
    :mod:`unet.segment`).
    """
    probs, masks = _frames("probabilities", cell_prob), _frames("masks", target)
    if len(probs) != len(masks) or any(p.shape != m.shape for p, m in zip(probs, masks)):
        raise ValueError(f"expected probabilities and masks of one shape, frame for frame, got "
                         f"{len(probs)} frames {[p.shape for p in probs][:3]} and {len(masks)} frames "
                         f"{[m.shape for m in masks][:3]}")
    pred = [(p >= threshold).astype(np.uint8) for p in probs]
    per_image = [case_scores(p, t) for p, t in zip(pred, masks)]
    out = {m: float(np.mean([s[m] for s in per_image])) for m in CASE_METRICS}
    counts = sum((confusion_counts(p, t) for p, t in zip(pred, masks)), ConfusionCounts())
    dataset_level = confusion_scores(counts)
    out.update({k: v for k, v in dataset_level.items() if k != "acc"})
    seg, filled = _mean_over_frames(plain_and_filled_scores, probs, masks)  # one pass for both
    out.update({k: float(seg[k]) for k in ("v_rand", "v_rand_threshold", "v_info", "v_info_threshold")})
    out.update({"v_rand_filled": filled["v_rand"], "v_rand_filled_threshold": filled["v_rand_threshold"],
                "v_info_filled": filled["v_info"], "v_info_filled_threshold": filled["v_info_threshold"]})
    return out


KEPT_SCORES = ("iou", "membrane_dice", "v_rand")  # the three a faster model must keep (issue 19)
TOLERANCE = 0.002


def scores_kept(scores: dict[str, float], reference: dict[str, float], tolerance: float = TOLERANCE) -> dict:
    """Whether ``scores`` lose less than ``tolerance`` against ``reference`` on each of
    :data:`KEPT_SCORES` (gains are fine): {"val", "reference", "loss", "tolerance", "keeps_scores"},
    ``loss`` the largest drop (negative: better on all three)."""
    losses = {k: reference[k] - scores[k] for k in KEPT_SCORES}
    worst = max(losses, key=losses.get)
    return {"val": {k: scores[k] for k in KEPT_SCORES}, "reference": {k: reference[k] for k in KEPT_SCORES},
            "loss": {"score": worst, "value": losses[worst]}, "tolerance": tolerance,
            "keeps_scores": losses[worst] < tolerance}
