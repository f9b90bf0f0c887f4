"""Inference at native frame size: binary masks, the challenge's probability TIFF, overlays.

Every prediction goes through the block engine (:mod:`unet.blocks`) that the segmentation flow
runs on whole volumes: models trained on resized frames (``input_mode="resize"``) see the frame
resized to the training size and their probabilities are resized back; native-resolution models
(``input_mode="crop"``) predict whole frames up to ``block`` pixels a side, larger frames block by
block, each with a halo wide enough that the result equals whole-frame inference. Optional
test-time augmentation averages the predictions of the flips/rotations (:mod:`unet.backends`);
optional test-time scales average the predictions of the frame resized by each.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import unet  # noqa: F401  (sets the oneDNN ISA cap before mindspore loads)

import cv2
import numpy as np
import tifffile

from unet.align import Alignment, shift
from unet.backends import as_predictor, load_model  # noqa: F401  (load_model: this module's API since the start)
from unet.blocks import DEFAULT_BLOCK, Settings, predict_section
from unet.data import middle_section, read_sections
from unet.recipes import Recipe

log = logging.getLogger(__name__)

MEMBRANE_BGR = (0, 0, 255)  # overlays draw predicted membrane in red


def predict_frame(net, frame: np.ndarray, recipe: Recipe, *, tta: bool | str = False,
                  block: int = DEFAULT_BLOCK, halo: int | None = None,
                  scales: Sequence[float] = (1.0,)) -> np.ndarray:
    """Cell probabilities float32 [H, W] for a uint8 frame [H, W] (or [H, W, 3] for a recipe of
    3 sections: :func:`unet.data.read_sections`), at the frame's own size. ``net``: a UNet or a
    predictor (:mod:`unet.backends`); ``tta``: True (8 views), False, or a level name; ``block`` and
    ``halo``: :class:`unet.blocks.Settings`. ``scales``: multi-scale test-time augmentation; the
    frame is predicted resized by each scale (bilinear; resize recipes scale their input size,
    rounded to a multiple of 16), each prediction is resized back and the probabilities are
    averaged. ``(1.0,)``: the frame as it is."""
    expected = (2,) if recipe.sections == 1 else (3,)
    if frame.ndim not in expected or (frame.ndim == 3 and frame.shape[-1] != recipe.sections):
        wanted = "a grey frame [H, W]" if recipe.sections == 1 else f"[H, W, {recipe.sections}] sections"
        raise ValueError(f"expected {wanted}, got shape {frame.shape}")
    settings = Settings(recipe, tta=tta, scales=tuple(scales), block=block, halo=halo)
    h, w = frame.shape[:2]
    if frame.ndim == 2:
        return predict_section(as_predictor(net), lambda z, y0, y1, x0, x1: frame[y0:y1, x0:x1],
                               (1, h, w), 0, settings)
    # the frame's sections as a small stack whose middle section is the one predicted
    return predict_section(as_predictor(net), lambda z, y0, y1, x0, x1: frame[y0:y1, x0:x1, z],
                           (recipe.sections, h, w), recipe.sections // 2, settings)


def overlay(frame: np.ndarray, cell_prob: np.ndarray, threshold: float = 0.5, alpha: float = 0.45) -> np.ndarray:
    """BGR picture of ``frame`` with the predicted membrane (prob < threshold) tinted red."""
    bgr = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    tint = bgr.copy()
    tint[cell_prob < threshold] = MEMBRANE_BGR
    return cv2.addWeighted(tint, alpha, bgr, 1 - alpha, 0)


@dataclass(frozen=True)
class PredictionOutputs:
    masks: Path           # <stem>.png, 255 = cell, 0 = membrane (the labels' convention), native size
    probabilities: Path   # float32 N x H x W TIFF of cell probabilities (the challenge's format)
    overlays: Path        # <stem>.png, frame with predicted membrane in red
    frames: int
    cell_prob: np.ndarray  # the probabilities written to the TIFF, float32 [N, H, W]
    unaligned_prob: np.ndarray | None = None  # the same before the alignment shift (when one was given)


def _imwrite(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):
        raise OSError(f"{path}: could not write image")


def predict_files(net, images: Sequence[Path], recipe: Recipe, out_dir: Path | str, *,
                  tta: bool = False, threshold: float = 0.5, align: Alignment | None = None,
                  on_frame: Callable[[int, int], None] | None = None,
                  scales: Sequence[float] = (1.0,)) -> PredictionOutputs:
    """Predict every PNG in ``images`` (in the given order) and write masks, the probability
    TIFF and overlays under ``out_dir``. Returns where they are, and the probabilities. With
    ``align``, each frame's probabilities are shifted by it first (:mod:`unet.align`); ``scales``:
    :func:`predict_frame`'s test-time scales."""
    out_dir = Path(out_dir)
    masks_dir, overlays_dir = out_dir / "masks", out_dir / "overlays"
    masks_dir.mkdir(parents=True, exist_ok=True)
    overlays_dir.mkdir(parents=True, exist_ok=True)
    probs, unaligned = [], []
    for i, path in enumerate(images):
        frame = read_sections(path, recipe.sections)
        prob = predict_frame(net, frame, recipe, tta=tta, scales=scales)
        frame = middle_section(frame)
        if align is not None:
            unaligned.append(prob)
            prob = shift(prob, align.dy, align.dx)
        probs.append(prob)
        stem = Path(path).stem
        _imwrite(masks_dir / f"{stem}.png", np.where(prob >= threshold, 255, 0).astype(np.uint8))
        _imwrite(overlays_dir / f"{stem}.png", overlay(frame, prob, threshold))
        if on_frame is not None:
            on_frame(i + 1, len(images))
    tiff = out_dir / "probabilities.tif"
    tmp = out_dir / "probabilities.tmp.tif"
    # one grey page per frame (without photometric, a 3-frame stack would be stored as RGB)
    stack = np.stack(probs).astype(np.float32)
    tifffile.imwrite(tmp, stack, photometric="minisblack")
    os.replace(tmp, tiff)
    log.info("predicted %d frames into %s", len(probs), out_dir)
    return PredictionOutputs(masks_dir, tiff, overlays_dir, len(probs), stack,
                             np.stack(unaligned).astype(np.float32) if unaligned else None)
