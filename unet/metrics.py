"""Segmentation scores for the UNet on ISBI 2012: the MindSpore case's per-image metrics, exact
dataset-level confusion scores for both classes, and the ISBI 2012 challenge scores V_rand and V_info.

Conventions: the positive class is *cell* (white, label 1), membrane is label 0. Predictions are
probabilities of "cell" in [0, 1]. Nothing here keeps global state, prints or writes files.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from skimage.measure import label

__all__ = [
    "CASE_METRICS",
    "DEFAULT_THRESHOLDS",
    "CaseScores",
    "ConfusionCounts",
    "case_scores",
    "confusion_counts",
    "confusion_scores",
    "best_over_thresholds",
    "segmentation_scores",
    "segmentation_sweep",
    "v_info",
    "v_rand",
]

CASE_METRICS: tuple[str, ...] = ("acc", "iou", "dice", "sens", "spec")
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.1 * k, 2) for k in range(1, 10))


# --------------------------------------------------------------------------- input checks


def _binary(name: str, a: Any) -> np.ndarray:
    """``a`` as a bool array; ValueError unless every value is 0 or 1 (bool accepted)."""
    arr = np.asarray(a)
    if arr.dtype == bool:
        return arr
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be numeric or bool, got dtype {arr.dtype}")
    bad = (arr != 0) & (arr != 1)
    if bad.any():
        found = np.unique(arr[bad])[:5].tolist()
        raise ValueError(f"{name} must be binary (0/1), found values such as {found}")
    return arr == 1


def _probabilities(name: str, a: Any) -> np.ndarray:
    """``a`` as a float64 array; ValueError unless every value is finite and in [0, 1]."""
    arr = np.asarray(a)
    if arr.dtype != bool and not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, found NaN or inf")
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ValueError(f"{name} must be probabilities in [0, 1], found range [{arr.min()}, {arr.max()}]")
    return arr


def _same_shape(names: tuple[str, str], a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError(f"{names[0]} and {names[1]} are empty (shape {a.shape})")


def _ratio(num: float, den: float) -> float:
    """``num / den`` with 0/0 defined as 1.0 (both sets empty: perfect agreement)."""
    return 1.0 if den == 0 else float(num) / float(den)


# --------------------------------------------------------------------------- the case's metrics


def case_scores(pred: np.ndarray, target: np.ndarray, smooth: float = 1e-5) -> dict[str, float]:
    """The five scores of the MindSpore UNet case for one image, computed as the case does.

    With ``p`` the binary prediction and ``t`` the binary target (cell = 1), sums over all pixels:

    - ``acc  = mean(p == t)``
    - ``iou  = sum(p*t) / (sum(p + t) - sum(p*t) + smooth)``
    - ``dice = 2*sum(p*t) / (sum(p) + sum(t) + smooth)``
    - ``sens = sum(p*t) / (sum(t) + smooth)``                     (cell recall)
    - ``spec = sum((1-t)*(1-p)) / (sum(1-t) + smooth)``           (membrane recall)

    Parameters
    ----------
    pred : ndarray
        Binary prediction (0/1 or bool), any shape.
    target : ndarray
        Binary ground truth (0/1 or bool), same shape as ``pred``.
    smooth : float, optional
        Positive constant added to every denominator, as in the case (so an empty class scores
        ~0, not 1; see :func:`confusion_scores` for the exact version).

    Returns
    -------
    scores : dict
        ``{"acc", "iou", "dice", "sens", "spec"}`` as Python floats.
    """
    if not np.isfinite(smooth) or smooth <= 0:
        raise ValueError(f"smooth must be a finite positive number, got {smooth}")
    p = _binary("pred", pred).astype(np.float64)
    t = _binary("target", target).astype(np.float64)
    _same_shape(("pred", "target"), p, t)
    inter = float(np.sum(p * t))
    return {
        "acc": float(np.mean(p == t)),
        "iou": inter / (float(np.sum(p + t)) - inter + smooth),
        "dice": 2.0 * inter / (float(np.sum(p)) + float(np.sum(t)) + smooth),
        "sens": inter / (float(np.sum(t)) + smooth),
        "spec": float(np.sum((1 - t) * (1 - p))) / (float(np.sum(1 - t)) + smooth),
    }


class CaseScores:
    """The MindSpore case's metric as a plain accumulator: per-image ``acc, iou, dice, sens, spec``,
    averaged over images (the MindSpore ``Metric`` of training wraps it: :class:`unet.case_metric.CaseMetrics`).

    ``update(y_pred, y)`` takes ``y_pred``, probabilities of cell of shape ``[N, 1, H, W]``, rounds
    them with ``np.round`` like the case (half to even, so exactly 0.5 becomes 0: a pixel is cell
    when its probability is > 0.5), and scores each image against the mask ``y`` (same shape,
    values in {0, 1}) with :func:`case_scores`. ``eval()`` returns the mean of each score over every
    image seen since ``clear()``.

    Note that these scores treat *cell*, the majority class of ISBI 2012 (about 78 % of the
    training-label pixels), as positive: ``iou``/``dice`` are cell scores and stay high even for
    a network that misses thin membranes. Use :func:`confusion_scores` for membrane scores and
    :func:`segmentation_scores` for the challenge's V_rand / V_info.

    Parameters
    ----------
    smooth : float, optional
        Constant added to the denominators, as in :func:`case_scores`.
    """

    def __init__(self, smooth: float = 1e-5) -> None:
        if not np.isfinite(smooth) or smooth <= 0:
            raise ValueError(f"smooth must be a finite positive number, got {smooth}")
        self.smooth = smooth
        self._sums: dict[str, float] = {}
        self._samples = 0
        self.clear()

    def clear(self) -> None:
        """Forget every image seen."""
        self._sums = {k: 0.0 for k in CASE_METRICS}
        self._samples = 0

    def update(self, y_pred: np.ndarray, y: np.ndarray) -> None:
        """Add a batch: ``y_pred`` probabilities ``[N, 1, H, W]``, ``y`` binary mask of the same shape."""
        pred = _probabilities("y_pred", np.asarray(y_pred))
        mask = _binary("y", np.asarray(y))
        if pred.ndim != 4 or pred.shape[1] != 1:
            raise ValueError(f"y_pred must have shape [N, 1, H, W], got {pred.shape}")
        _same_shape(("y_pred", "y"), pred, mask)
        for p, t in zip(np.round(pred), mask):
            for k, v in case_scores(p, t, self.smooth).items():
                self._sums[k] += v
        self._samples += pred.shape[0]

    def eval(self) -> dict[str, float]:
        """Mean of each case score over the images seen; RuntimeError if there were none."""
        if self._samples == 0:
            raise RuntimeError(f"{type(self).__name__}.eval() called before any update(): no images to score")
        return {k: s / self._samples for k, s in self._sums.items()}


# --------------------------------------------------------------------------- confusion scores


@dataclass(frozen=True)
class ConfusionCounts:
    """Pixel counts of a binary confusion matrix, cell positive.

    ``tp``: cell predicted cell; ``fp``: membrane predicted cell; ``fn``: cell predicted
    membrane; ``tn``: membrane predicted membrane. Counts add up with ``+`` (and ``sum()``),
    so a dataset's matrix is the sum of its frames'.
    """

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __post_init__(self) -> None:
        for name in ("tp", "fp", "fn", "tn"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"ConfusionCounts.{name} must be a non-negative int, got {v!r}")
            object.__setattr__(self, name, int(v))

    @property
    def total(self) -> int:
        """Number of pixels counted."""
        return self.tp + self.fp + self.fn + self.tn

    def __add__(self, other: object) -> ConfusionCounts:
        if not isinstance(other, ConfusionCounts):
            return NotImplemented
        return ConfusionCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    def __radd__(self, other: object) -> ConfusionCounts:
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:  # sum() starts at 0
            return self
        return NotImplemented


def confusion_counts(pred: np.ndarray, target: np.ndarray) -> ConfusionCounts:
    """Confusion matrix of a binary prediction against a binary target, cell (1) positive.

    Parameters
    ----------
    pred, target : ndarray
        Binary arrays (0/1 or bool) of the same shape, any number of dimensions.
    """
    p = _binary("pred", pred)
    t = _binary("target", target)
    _same_shape(("pred", "target"), p, t)
    return ConfusionCounts(
        tp=int(np.count_nonzero(p & t)),
        fp=int(np.count_nonzero(p & ~t)),
        fn=int(np.count_nonzero(~p & t)),
        tn=int(np.count_nonzero(~p & ~t)),
    )


def confusion_scores(c: ConfusionCounts) -> dict[str, float]:
    """Dataset-level scores of both classes from one (summed) confusion matrix.

    With cell positive (``tp, fp, fn, tn``) and membrane positive (its true positives are ``tn``,
    its false positives ``fn``, its false negatives ``fp``):

    - ``acc = (tp + tn) / (tp + fp + fn + tn)``
    - ``cell_iou = tp / (tp + fp + fn)``, ``cell_dice = 2 tp / (2 tp + fp + fn)``
    - ``cell_precision = tp / (tp + fp)``, ``cell_recall = tp / (tp + fn)`` (sensitivity)
    - ``membrane_iou = tn / (tn + fn + fp)``, ``membrane_dice = 2 tn / (2 tn + fn + fp)``
    - ``membrane_precision = tn / (tn + fn)``, ``membrane_recall = tn / (tn + fp)`` (specificity)
    - ``balanced_accuracy = (cell_recall + membrane_recall) / 2``

    A ratio 0/0 is defined as 1.0: both sets it compares are empty, which is perfect agreement
    (e.g. ``membrane_iou`` of an all-cell prediction of an all-cell target). No smoothing.

    Parameters
    ----------
    c : ConfusionCounts
        The confusion matrix, e.g. ``sum(confusion_counts(p, t) for p, t in frames)``.
    """
    if not isinstance(c, ConfusionCounts):
        raise ValueError(f"c must be a ConfusionCounts, got {type(c).__name__}")
    tp, fp, fn, tn = c.tp, c.fp, c.fn, c.tn
    cell_recall = _ratio(tp, tp + fn)
    membrane_recall = _ratio(tn, tn + fp)
    return {
        "acc": _ratio(tp + tn, c.total),
        "cell_iou": _ratio(tp, tp + fp + fn),
        "cell_dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "cell_precision": _ratio(tp, tp + fp),
        "cell_recall": cell_recall,
        "membrane_iou": _ratio(tn, tn + fn + fp),
        "membrane_dice": _ratio(2 * tn, 2 * tn + fn + fp),
        "membrane_precision": _ratio(tn, tn + fn),
        "membrane_recall": membrane_recall,
        "balanced_accuracy": (cell_recall + membrane_recall) / 2.0,
    }


# --------------------------------------------------------------------------- ISBI 2012 scores


def _label_images(name: str, a: Any) -> np.ndarray:
    arr = np.asarray(a)
    if not np.issubdtype(arr.dtype, np.integer) or (arr.size and arr.min() < 0):
        raise ValueError(f"{name} must be a label image of non-negative ints, got dtype {arr.dtype}")
    return arr


def _entropy(counts: np.ndarray) -> float:
    """Shannon entropy in bits of a distribution given by its (non-zero) counts: ``-sum_k q_k log2 q_k``."""
    q = counts / counts.sum()
    return float(-np.sum(q * np.log2(q)))


def _consecutive(labels: np.ndarray) -> np.ndarray:
    """``labels`` (non-negative ints, 1-D) as they are when their values are small (bincount-able),
    else renumbered 0..k-1 in the same order."""
    if labels.max() < 4 * labels.size + 1024:
        return labels.astype(np.int64, copy=False)
    return np.unique(labels, return_inverse=True)[1].astype(np.int64)


@dataclass(frozen=True)
class _Overlap:
    """The contingency table of two label images over the gt-foreground pixels: ``joint`` the
    non-zero pixel counts n_ij, ``joint_gt`` the gt segment size a_i of each, ``gt`` and ``pred`` the
    non-zero segment sizes a_i and b_j, ``n`` the number of pixels. One table serves both scores
    (scikit-image builds a sparse one per score, and two for V_info)."""
    joint: np.ndarray
    joint_gt: np.ndarray
    gt: np.ndarray
    pred: np.ndarray
    n: int


@dataclass(frozen=True)
class _Truth:
    """The ground truth's part of :func:`_overlap`, computed once per frame for a sweep: its
    foreground pixels ``fg``, their labels ``g`` (renumbered when large) and the segment sizes."""
    fg: np.ndarray
    g: np.ndarray
    sizes: np.ndarray

    @classmethod
    def of(cls, gt: np.ndarray) -> _Truth:
        fg = gt != 0
        g = _consecutive(gt[fg].ravel()) if fg.any() else np.zeros(0, np.int64)
        return cls(fg, g, np.bincount(g))


def _overlap(gt: np.ndarray | _Truth, pred: np.ndarray) -> _Overlap:
    truth = gt if isinstance(gt, _Truth) else _Truth.of(gt)
    g, gt_sizes = truth.g, truth.sizes
    if g.size == 0:
        empty = np.zeros(0)
        return _Overlap(empty, empty, empty, empty, 0)
    s = _consecutive(pred[truth.fg].ravel())
    width = int(s.max()) + 1
    pred_sizes = np.bincount(s)
    pairs = g * width + s
    if int(g.max()) * width < 8 * pairs.size + (1 << 20):
        joint = np.bincount(pairs)
        index = np.flatnonzero(joint)
        joint = joint[index]
    else:  # many segments on both sides: count the pairs that occur only
        index, joint = np.unique(pairs, return_counts=True)
    return _Overlap(joint.astype(np.float64), gt_sizes[index // width].astype(np.float64),
                    gt_sizes[gt_sizes > 0].astype(np.float64), pred_sizes[pred_sizes > 0].astype(np.float64),
                    int(g.size))


def _rand_of(t: _Overlap) -> float:
    """V_rand from the table, as ``1 - skimage.metrics.adapted_rand_error(...)[0]`` computes it."""
    if t.n == 0 or (np.all(t.gt == 1) and np.all(t.pred == 1)):
        return 1.0
    same = t.joint @ t.joint - t.n
    return float(same / (0.5 * (t.gt @ t.gt - t.n) + 0.5 * (t.pred @ t.pred - t.n)))


def _info_of(t: _Overlap) -> float:
    """V_info from the table; ``H(S|T) = -sum_ij n_ij/N log2(n_ij / a_i)`` (0 exactly when every
    predicted segment lies in one gt segment)."""
    if t.n == 0:
        return 1.0
    h_s, h_t = _entropy(t.pred), _entropy(t.gt)
    h_s_given_t = float(-np.sum(t.joint / t.n * np.log2(t.joint / t.joint_gt)))
    mutual = min(max(h_s - h_s_given_t, 0.0), h_s, h_t)  # clip float round-off
    precision = 1.0 if h_s == 0 else mutual / h_s
    recall = 1.0 if h_t == 0 else mutual / h_t
    if precision + recall == 0:
        return 0.0
    return 2.0 * precision * recall / (precision + recall)


def v_rand(gt_labels: np.ndarray, pred_labels: np.ndarray) -> float:
    """Foreground-restricted Rand F-score (ISBI 2012 V_rand) of one label image.

    The value of ``1 - skimage.metrics.adapted_rand_error(gt_labels, pred_labels,
    ignore_labels=(0,))[0]`` (to float round-off; tests/unet/test_metrics.py checks it), i.e. with
    ``n_ij`` the number of gt-foreground pixels in gt segment ``i`` and predicted segment ``j``,
    ``a_i = sum_j n_ij``, ``b_j = sum_i n_ij`` and ``N`` the number of gt-foreground pixels:

    ``V_rand = (sum n_ij^2 - N) / (0.5 (sum a_i^2 - N) + 0.5 (sum b_j^2 - N))``

    (pairs of *distinct* pixels, as scikit-image computes it). Pixels whose gt label is 0 are not
    scored; predicted label 0 on gt-foreground pixels counts as one more predicted segment.
    Edge cases, defined as 1.0 (nothing wrong can be measured): no gt-foreground pixel, or every
    gt and predicted segment reduced to a single pixel (no pair shares a label on either side).

    Parameters
    ----------
    gt_labels : ndarray of int
        Ground-truth segmentation, 0 = boundary/background (ignored).
    pred_labels : ndarray of int
        Predicted segmentation, same shape.
    """
    gt = _label_images("gt_labels", gt_labels)
    pred = _label_images("pred_labels", pred_labels)
    _same_shape(("gt_labels", "pred_labels"), gt, pred)
    return _rand_of(_overlap(gt, pred))


def v_info(gt_labels: np.ndarray, pred_labels: np.ndarray) -> float:
    """Foreground-restricted information-theoretic F-score (ISBI 2012 V_info) of one label image.

    On the pixels where ``gt_labels != 0``, let ``S`` be the predicted label and ``T`` the gt
    label. Entropies are in bits, from the label frequencies over those pixels:
    ``H(S) = -sum_k q_k log2 q_k`` (same for ``T``) and ``H(S|T)`` (false splits) the first entry
    of ``skimage.metrics.variation_of_information(gt_labels, pred_labels, ignore_labels=(0,))``
    (computed here from the same contingency table as V_rand; tests check the two agree). Then

    ``I(S;T) = H(S) - H(S|T)``, ``P = I / H(S)``, ``R = I / H(T)``, ``V_info = 2 P R / (P + R)``.

    Edge cases without NaN: ``P = 1`` when ``H(S) = 0`` (a single predicted segment splits
    nothing), ``R = 1`` when ``H(T) = 0`` (a single gt segment cannot be merged), ``V_info = 0``
    when ``P + R = 0``, and ``V_info = 1`` when there is no gt-foreground pixel.

    Parameters
    ----------
    gt_labels : ndarray of int
        Ground-truth segmentation, 0 = boundary/background (ignored).
    pred_labels : ndarray of int
        Predicted segmentation, same shape.
    """
    gt = _label_images("gt_labels", gt_labels)
    pred = _label_images("pred_labels", pred_labels)
    _same_shape(("gt_labels", "pred_labels"), gt, pred)
    return _info_of(_overlap(gt, pred))


def _check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    try:
        ts = tuple(round(float(t), 2) for t in thresholds)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"thresholds must be a sequence of numbers, got {thresholds!r}") from exc
    if not ts:
        raise ValueError("thresholds is empty")
    if any(not 0.0 <= t <= 1.0 for t in ts):  # also rejects NaN
        raise ValueError(f"thresholds must be in [0, 1], got {ts}")
    if len(set(ts)) != len(ts):
        raise ValueError(f"thresholds must be distinct after rounding to 2 decimals, got {ts}")
    return ts


def segmentation_scores(
    cell_prob: np.ndarray,
    target: np.ndarray,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    segment: Callable[[np.ndarray, float], np.ndarray] | None = None,
) -> dict[str, Any]:
    """ISBI 2012 challenge scores V_rand and V_info of a stack, best over thresholds.

    For each threshold ``t`` and each frame, the predicted segmentation is the 4-connected
    components of ``cell_prob >= t`` (``skimage.measure.label(..., connectivity=1)``; or
    ``segment(frame, t)`` when given, a post-processing such as :func:`unet.segment.segment_cells`), the
    ground truth the 4-connected components of ``target > 0``; each frame is scored with
    :func:`v_rand` and :func:`v_info` (gt foreground only), and the scores are averaged over the
    frames. The best mean over thresholds is reported with its threshold (ties: the first
    threshold in the given order). Unlike the challenge's official script, borders are not
    thinned first.

    Parameters
    ----------
    cell_prob : ndarray of float
        Probability of cell, in [0, 1], shape ``[N, H, W]`` or a single frame ``[H, W]``.
    target : ndarray
        Binary ground truth (1 = cell, 0 = membrane), same shape.
    thresholds : sequence of float, optional
        Distinct values in [0, 1]; rounded to 2 decimals, which are the values used.
    segment : callable, optional
        ``(frame [H, W], threshold) -> label image``, called from several threads (one threshold
        each); default: the 4-connected components.

    Returns
    -------
    scores : dict
        ``{"v_rand", "v_rand_threshold", "v_info", "v_info_threshold", "per_threshold"}``, where
        ``per_threshold`` maps each threshold to ``{"v_rand": mean, "v_info": mean}``.
    """
    if segment is None:
        def segment(frame: np.ndarray, t: float) -> np.ndarray:
            return label(frame >= t, connectivity=1)
    return segmentation_sweep(cell_prob, target, thresholds, lambda frame, t: (segment(frame, t),))[0]


def segmentation_sweep(
    cell_prob: np.ndarray,
    target: np.ndarray,
    thresholds: Sequence[float],
    segmentations: Callable[[np.ndarray, float], Sequence[np.ndarray]],
) -> list[dict[str, Any]]:
    """:func:`segmentation_scores` of several segmentations in one pass: ``segmentations(frame, t)``
    returns the label images of one frame at threshold ``t`` (several segmentations made from the
    same components label them once: :func:`unet.segment.plain_and_filled_scores`); one result per
    segmentation, in its order, each as :func:`segmentation_scores` returns it. Each threshold and
    frame is a job for threads, one per core (labelling, the filled segmentation's distance
    transform and the overlap tables release the GIL); the ground truth's labels and their part of
    the overlap tables are computed once per frame. The same numbers."""
    prob = _probabilities("cell_prob", cell_prob)
    mask = _binary("target", target)
    _same_shape(("cell_prob", "target"), prob, mask)
    if prob.ndim == 2:
        prob, mask = prob[None], mask[None]
    if prob.ndim != 3:
        raise ValueError(f"cell_prob and target must have shape [N, H, W] or [H, W], got {prob.shape}")
    if len(prob) == 0:
        raise ValueError("cell_prob and target have no frames")
    ts = _check_thresholds(thresholds)
    truths = [_Truth.of(label(m, connectivity=1)) for m in mask]

    def tables(job: tuple[float, int]) -> list[_Overlap]:  # one per segmentation of frame i at t
        t, i = job
        return [_overlap(truths[i], labels) for labels in segmentations(prob[i], t)]

    # a job per threshold and frame (not per threshold: 9 thresholds on 2 cores would leave one idle
    # for the last), in threads, one per core
    jobs = [(t, i) for t in ts for i in range(len(prob))]
    with ThreadPoolExecutor(max_workers=min(len(jobs), len(os.sched_getaffinity(0)))) as pool:
        done = dict(zip(jobs, pool.map(tables, jobs)))
    kinds = len(done[jobs[0]])
    return [best_over_thresholds({t: {"v_rand": float(np.mean([_rand_of(done[t, i][k]) for i in range(len(prob))])),
                                      "v_info": float(np.mean([_info_of(done[t, i][k]) for i in range(len(prob))]))}
                                  for t in ts})
            for k in range(kinds)]


def best_over_thresholds(per_threshold: dict[float, dict[str, float]]) -> dict[str, Any]:
    """The best V_rand and V_info of ``per_threshold`` (threshold -> frame means) with their
    thresholds (ties: the first threshold in its order), and ``per_threshold`` itself."""
    best_rand = max(per_threshold, key=lambda t: per_threshold[t]["v_rand"])
    best_info = max(per_threshold, key=lambda t: per_threshold[t]["v_info"])
    return {
        "v_rand": per_threshold[best_rand]["v_rand"],
        "v_rand_threshold": best_rand,
        "v_info": per_threshold[best_info]["v_info"],
        "v_info_threshold": best_info,
        "per_threshold": per_threshold,
    }
