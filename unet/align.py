"""Registration of predictions to the annotation: one sub-pixel shift, estimated on the training frames.

A network trained with flips and rotations (the ``fullres`` and ``case`` augmentations) cannot learn
an offset of the labels that has one direction in the original orientation: turned by the
augmentation it points every way, so the network centres its membranes on the image's. When the
annotators drew their membranes off-centre — the ISBI 2012 labels sit about half a pixel above the
dark membrane pixels of their images (``benchmarks/alignment.py``) — every edge pixel of the ground
truth is then a coin toss, and edge pixels are most of the errors.

:func:`estimate_shift` finds the shift (a grid of ``step`` pixels up to ``max_shift`` each way) that
best maps the predictions of the *training* frames onto their labels (lowest mean squared error of
the probabilities); :func:`shift` applies it to val and test predictions. On data whose labels are
centred the estimate is (0, 0) or a fraction of a pixel, and nothing changes.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np


@dataclass(frozen=True)
class Alignment:
    """A shift in pixels: content at (y, x) moves to (y + dy, x + dx); with the mean squared error
    of the training frames' probabilities before and after it."""

    dy: float = 0.0
    dx: float = 0.0
    mse_before: float = float("nan")
    mse_after: float = float("nan")

    @property
    def is_zero(self) -> bool:
        return self.dy == 0.0 and self.dx == 0.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "Alignment":
        """From :meth:`to_dict`'s keys (others, such as the evaluate stage's ``applied``, ignored)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data}) if data else cls()


def image_as_probability(frames: np.ndarray) -> np.ndarray:
    """Grey frames [N, H, W] read as a crude cell probability, no network involved: Gaussian blur
    sigma 1, rescaled between each frame's 10th and 60th percentile (bright = cell). Matching it
    to the labels with :func:`estimate_shift` shows whether the labels sit off their membranes."""
    blurred = np.stack([cv2.GaussianBlur(np.asarray(f, np.float32), (0, 0), 1.0) for f in frames])
    lo, hi = np.percentile(blurred, [10, 60], axis=(1, 2), keepdims=True)
    return np.clip((blurred - lo) / (hi - lo), 0.0, 1.0)


def shift(prob: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """Probabilities [H, W] or [N, H, W] moved by (``dy``, ``dx``) pixels: bilinear, mirrored borders,
    float32. (0, 0) returns the input unchanged (as float32)."""
    prob = np.asarray(prob, dtype=np.float32)
    if prob.ndim not in (2, 3):
        raise ValueError(f"expected probabilities [H, W] or [N, H, W], got shape {prob.shape}")
    if dy == 0 and dx == 0:
        return prob
    if prob.ndim == 3:
        return np.stack([shift(p, dy, dx) for p in prob])
    h, w = prob.shape
    matrix = np.float32([[1, 0, dx], [0, 1, dy]])
    return cv2.warpAffine(prob, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def _shifted_mse(prob: np.ndarray, target: np.ndarray, dy: float, dx: float, margin: int) -> float:
    """The mean squared error of ``prob`` [N, H, W] moved by (``dy``, ``dx``) against ``target``
    [N, H, W] (float32 both) at least ``margin`` pixels from the borders: frame by frame, each frame
    shifted as :func:`shift` does, the squares summed in float64 by NumPy. Not OpenCV's
    ``cv2.norm``: its sum depends on the arrays' memory alignment (two results an ulp apart for the
    same pixels), and the same run must give the same numbers whatever its process did before."""
    inner = np.s_[margin:-margin, margin:-margin] if margin else np.s_[:, :]
    total = 0.0
    for p, t in zip(prob, target):
        d = np.subtract(shift(p, dy, dx)[inner], t[inner])
        np.square(d, out=d)
        total += float(d.sum(dtype=np.float64))
    return total / target[:, inner[0], inner[1]].size


def estimate_shift(prob: np.ndarray, target: np.ndarray, max_shift: float = 1.5, step: float = 0.25) -> Alignment:
    """The shift (each axis a multiple of ``step`` up to ``max_shift`` pixels) that minimises the mean
    squared error between ``prob`` [N, H, W] (cell probabilities) and ``target`` [N, H, W] (binary,
    1 = cell), scored away from the frame borders. Searched coarse to fine (the error is smooth in
    the shift): a grid of 1 px (4 steps of 0.25 px) first, then the neighbours of the best 2 steps
    away, then 1 step away; 20-25 candidates instead of the 49 of a 0.5 px grid, and the same shift
    as that grid's search for every shift of real predictions tried (benchmarks/README.md); ties
    (errors within a part in a million) go to the smaller shift."""
    prob = np.asarray(prob, dtype=np.float32)
    target = np.asarray(target).astype(np.float32)
    if prob.ndim != 3 or prob.shape != target.shape:
        raise ValueError(f"expected probabilities and masks of one shape [N, H, W], got "
                         f"{prob.shape} and {target.shape}")
    if step <= 0 or max_shift < 0:
        raise ValueError(f"expected step > 0 and max_shift >= 0, got {step} / {max_shift}")
    margin = int(np.ceil(max_shift)) + 1
    if min(prob.shape[1:]) <= 2 * margin:
        raise ValueError(f"frames of {prob.shape[1:]} are too small to estimate a shift of up to {max_shift} px")
    limit = int(round(max_shift / step))  # in steps
    scores: dict[tuple[int, int], float] = {}

    def error(c: tuple[int, int]) -> float:
        return _shifted_mse(prob, target, c[0] * step, c[1] * step, margin)

    def best_of(candidates) -> tuple[int, int]:
        new = [c for c in dict.fromkeys(candidates) if c not in scores and max(abs(c[0]), abs(c[1])) <= limit]
        # the candidates in threads, one per core: OpenCV releases the GIL
        with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
            scores.update(zip(new, pool.map(error, new)))
        # the smallest error; among errors equal to a part in a million (the interpolation's rounding
        # of a flat prediction differs by less) the smaller shift
        best = min(scores.values())
        ties = [c for c in scores if scores[c] <= best * (1 + 1e-6)]
        return min(ties, key=lambda c: (abs(c[0]) + abs(c[1]), c))

    spacing = 1  # the coarse grid's, in steps: the largest power of two within the limit (4: 1 px)
    while spacing * 2 <= limit:
        spacing *= 2
    grid = range(-(limit // spacing) * spacing, limit + 1, spacing)
    y, x = best_of([(0, 0)] + [(dy, dx) for dy in grid for dx in grid])
    while spacing > 1:  # then the neighbours of the best, half as far each time
        spacing //= 2
        y, x = best_of([(y + a * spacing, x + b * spacing) for a in (-1, 0, 1) for b in (-1, 0, 1)])
    return Alignment(dy=y * step, dx=x * step, mse_before=scores[(0, 0)], mse_after=scores[(y, x)])
