"""Test-time augmentation (TTA): the views of an input a predictor sees, mapped back and averaged.

Levels: ``none`` (the input as it is), ``flips`` (4 views: as it is, flipped left-right, up-down,
both), ``d4`` (the 8 flips and rotations, the dihedral group D4), and ``d4-flips``, whose views
depend on the test-time scale: d4 at scale 1, flips at the others (:func:`views_at`; 16 passes for
the fullres scales 0.875 / 1 / 1.125 instead of d4's 24). A predictor is any function
from a float32 batch [N, C, H, W] to cell probabilities [N, H, W] (:mod:`unet.backends` has the
MindSpore and ONNX Runtime ones).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

# Indices k of :func:`d4` (k % 4 quarter turns, then a left-right flip when k >= 4) per TTA level.
TTA_VIEWS: dict[str, tuple[int, ...]] = {"none": (0,), "flips": (0, 4, 6, 2), "d4": tuple(range(8))}
# Levels whose views depend on the test-time scale: (views at scale 1, views at the other scales).
SCALED_LEVELS: dict[str, tuple[str, str]] = {"d4-flips": ("d4", "flips")}
LEVELS = (*TTA_VIEWS, *SCALED_LEVELS)
# At most this many pixels go through the network in one call: the 8 views of a 512x512 frame
# form one batch (as before blocks existed), a larger block's views go a few at a time.
BATCH_PIXELS = 8 * 512 * 512


class Predictor(Protocol):
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Cell probabilities float32 [N, H, W] of a float32 batch [N, C, H, W]."""


def tta_level(tta: bool | str | None) -> str:
    """``True``/``False`` (a recipe's ``tta``) or a level name -> the level name; ValueError otherwise."""
    if tta is True:
        return "d4"
    if tta is False or tta is None:
        return "none"
    if tta not in LEVELS:
        raise ValueError(f"unknown TTA level {tta!r}; expected one of {', '.join(LEVELS)}")
    return tta


def views_at(tta: bool | str | None, scale: float) -> str:
    """The views (a key of :data:`TTA_VIEWS`) that level ``tta`` uses at test-time ``scale``."""
    level = tta_level(tta)
    if level in SCALED_LEVELS:
        at_one, elsewhere = SCALED_LEVELS[level]
        return at_one if scale == 1.0 else elsewhere
    return level


def default_level(recipe_tta: bool | str | None, scales: tuple[float, ...] | list[float]) -> str:
    """The segmentation's TTA level for a model whose recipe says ``recipe_tta``, at test-time
    ``scales``: the recipe's level, except that d4 at more scales than 1 becomes ``d4-flips``. On the
    fullres champion that level keeps d4's val scores within 0.002 (cell IoU, membrane Dice, V_rand;
    both precisions) at 2/3 of its passes, and no cheaper level does (benchmarks/tta_levels.py: the
    issue's rule, docs/results.md)."""
    level = tta_level(recipe_tta)
    return "d4-flips" if level == "d4" and tuple(float(s) for s in scales) != (1.0,) else level


def d4(x: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 flips/rotations of the last two axes (k in 0..7)."""
    x = np.rot90(x, k % 4, axes=(-2, -1))
    return np.flip(x, axis=-1) if k >= 4 else x


def d4_inverse(x: np.ndarray, k: int) -> np.ndarray:
    """Undoes :func:`d4` with the same ``k``."""
    if k >= 4:
        x = np.flip(x, axis=-1)
    return np.rot90(x, -(k % 4), axes=(-2, -1))


def predict_views(predictor: Predictor, x: np.ndarray, tta: bool | str = "none") -> np.ndarray:
    """[C, H, W] float32 -> [H, W] float32 probabilities, averaged over the views of ``tta`` (a
    scale-dependent level: its views at scale 1). Views of one shape go through the predictor
    together, at most :data:`BATCH_PIXELS` at a time."""
    views = TTA_VIEWS[views_at(tta, 1.0)]
    groups: dict[tuple[int, ...], list[int]] = {}
    for k in views:  # a non-square input has two shapes: as it is and turned a quarter
        groups.setdefault(d4(x, k).shape, []).append(k)
    per_call = max(1, BATCH_PIXELS // (x.shape[-1] * x.shape[-2]))
    total = np.zeros(x.shape[-2:], np.float32)
    for ks in groups.values():
        for i in range(0, len(ks), per_call):
            chunk = ks[i:i + per_call]
            probs = predictor(np.ascontiguousarray(np.stack([d4(x, k) for k in chunk]), dtype=np.float32))
            for k, p in zip(chunk, probs):
                total += d4_inverse(p, k)
    return total / len(views) if len(views) > 1 else total
