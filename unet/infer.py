"""Inference at native frame size: binary masks, the challenge's probability TIFF, overlays.

Models trained on resized frames (``input_mode="resize"``) see the frame resized to the training
size and their probabilities are resized back. Native-resolution models (``input_mode="crop"``)
predict whole frames, or overlapping mirror-padded tiles blended with a smooth weight when the
frame is larger than ``tile``. Optional 8-fold test-time augmentation averages the predictions of
the 8 flips/rotations (the dihedral group D4), each mapped back; optional test-time scales average
the predictions of the frame resized by each (``predict_frame(..., scales=...)``).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import unet  # noqa: F401  (sets the oneDNN ISA cap before mindspore loads)

import cv2
import mindspore as ms
import mindspore.ops as ops
import numpy as np
import tifffile

from unet.align import Alignment, shift
from unet.data import middle_section, read_sections, to_network_input
from unet.model import UNet
from unet.recipes import Recipe

log = logging.getLogger(__name__)

MEMBRANE_BGR = (0, 0, 255)  # overlays draw predicted membrane in red


def load_model(checkpoint: Path | str, recipe: Recipe) -> UNet:
    """The UNet of ``recipe`` with weights from ``checkpoint``, in inference mode."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: checkpoint not found")
    ms.set_context(mode=ms.GRAPH_MODE)
    net = UNet(recipe.in_channels, recipe.base_channels)
    mismatch = (f"{checkpoint}: does not match the recipe {recipe.name!r} "
                f"(in_channels={recipe.in_channels}, base_channels={recipe.base_channels})")
    try:
        missing, _ = ms.load_param_into_net(net, ms.load_checkpoint(str(checkpoint)), strict_load=True)
    except RuntimeError as exc:  # mindspore reports a shape mismatch as RuntimeError
        raise ValueError(f"{mismatch}: {str(exc).splitlines()[0]}") from None
    if missing:
        raise ValueError(f"{mismatch}: missing {len(missing)} parameters such as {missing[0]}")
    net.set_train(False)
    return net


def _d4(x: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 flips/rotations of the last two axes (k in 0..7)."""
    x = np.rot90(x, k % 4, axes=(-2, -1))
    return np.flip(x, axis=-1) if k >= 4 else x


def _d4_inverse(x: np.ndarray, k: int) -> np.ndarray:
    if k >= 4:
        x = np.flip(x, axis=-1)
    return np.rot90(x, -(k % 4), axes=(-2, -1))


def _forward(net: UNet, batch: np.ndarray) -> np.ndarray:
    """Cell probabilities [N, H, W] for a float32 batch [N, C, H, W]."""
    out = ops.sigmoid(net(ms.Tensor(np.ascontiguousarray(batch, dtype=np.float32))))
    return out.asnumpy()[:, 0]


def _predict_tta(net: UNet, x: np.ndarray, tta: bool) -> np.ndarray:
    """[C, H, W] -> [H, W] probabilities, averaged over the 8 D4 transforms when ``tta``."""
    if not tta:
        return _forward(net, x[None])[0]
    views = [_d4(x, k) for k in range(8)]
    # square inputs keep one shape for all 8 views: one compiled graph, one batch
    if x.shape[-1] == x.shape[-2]:
        probs = _forward(net, np.stack(views))
    else:
        probs = [_forward(net, v[None])[0] for v in views]
    return np.mean([_d4_inverse(p, k) for k, p in enumerate(probs)], axis=0)


def _tile_weight(size: int) -> np.ndarray:
    """A smooth 2-D blending weight that falls towards the tile's edges (never to zero)."""
    w = np.hanning(size + 2)[1:-1]
    return np.outer(w, w).astype(np.float32) + 1e-3


def _predict_tiled(net: UNet, x: np.ndarray, tile: int, overlap: int, tta: bool) -> np.ndarray:
    """Overlapping tiles of side ``tile`` over the mirror-padded frame, blended."""
    _, h, w = x.shape
    step = tile - overlap
    ny, nx = max(1, -(-(h - overlap) // step)), max(1, -(-(w - overlap) // step))
    ph, pw = (ny - 1) * step + tile, (nx - 1) * step + tile
    padded = np.pad(x, ((0, 0), (0, ph - h), (0, pw - w)), mode="reflect")
    acc = np.zeros((ph, pw), np.float32)
    norm = np.zeros((ph, pw), np.float32)
    weight = _tile_weight(tile)
    for iy in range(ny):
        for ix in range(nx):
            y0, x0 = iy * step, ix * step
            acc[y0:y0 + tile, x0:x0 + tile] += weight * _predict_tta(net, padded[:, y0:y0 + tile, x0:x0 + tile], tta)
            norm[y0:y0 + tile, x0:x0 + tile] += weight
    return (acc / norm)[:h, :w]


def predict_frame(net: UNet, frame: np.ndarray, recipe: Recipe, *, tta: bool = False,
                  tile: int = 512, overlap: int = 64, scales: Sequence[float] = (1.0,)) -> np.ndarray:
    """Cell probabilities float32 [H, W] for a uint8 frame [H, W] (or [H, W, 3] for a recipe of
    3 sections: :func:`unet.data.read_sections`), at the frame's own size. ``scales``: multi-scale
    test-time augmentation; the frame is predicted resized by each scale (bilinear; resize recipes
    scale their input size, rounded to a multiple of 16), each prediction is resized back and the
    probabilities are averaged. ``(1.0,)``: the frame as it is."""
    expected = (2,) if recipe.sections == 1 else (3,)
    if frame.ndim not in expected or (frame.ndim == 3 and frame.shape[-1] != recipe.sections):
        wanted = "a grey frame [H, W]" if recipe.sections == 1 else f"[H, W, {recipe.sections}] sections"
        raise ValueError(f"expected {wanted}, got shape {frame.shape}")
    if not scales or any(not 0.25 <= s <= 4.0 for s in scales):
        raise ValueError(f"test-time scales must be between 0.25 and 4, got {list(scales)}")
    probs = [_predict_at_scale(net, frame, recipe, s, tta, tile, overlap) for s in scales]
    return probs[0] if len(probs) == 1 else np.mean(probs, axis=0).astype(np.float32)


def _predict_at_scale(net: UNet, frame: np.ndarray, recipe: Recipe, scale: float, tta: bool,
                      tile: int, overlap: int) -> np.ndarray:
    h, w = frame.shape[:2]
    if recipe.input_mode == "resize":
        side = recipe.image_size if scale == 1.0 else max(16, int(round(recipe.image_size * scale / 16)) * 16)
        small = cv2.resize(frame, (side, side), interpolation=cv2.INTER_LINEAR)
        prob = _predict_tta(net, to_network_input(small, recipe.in_channels), tta)
        return cv2.resize(prob.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    if scale != 1.0:  # the tile scales too: a frame predicted whole at scale 1 is predicted whole here
        scaled = cv2.resize(frame, (max(16, round(w * scale)), max(16, round(h * scale))),
                            interpolation=cv2.INTER_LINEAR)
        tile = max(tile, int(np.ceil(tile * scale / 16)) * 16)
        prob = _predict_at_scale(net, scaled, recipe, 1.0, tta, tile, overlap)
        return cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)
    x = to_network_input(frame, recipe.in_channels)
    if h <= tile and w <= tile:
        return _predict_tta(net, x, tta).astype(np.float32)
    return _predict_tiled(net, x, tile, overlap, tta)


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


def predict_files(net: UNet, images: Sequence[Path], recipe: Recipe, out_dir: Path | str, *,
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
