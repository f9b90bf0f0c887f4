"""Label volumes of three declared kinds -> the binary cell masks the pipeline trains on (255 = cell).

| kind | 0 means | any other value means |
|---|---|---|
| ``membrane`` | membrane | cell (ISBI 2012's labels: 255 = cell, 0 = membrane) |
| ``cells`` | cell | membrane (the inverse) |
| ``instances`` | not cell (membrane, unlabelled, outside) | the id of one cell (neuron, ...) |

``membrane`` and ``cells`` labels must be binary: 0/255, 0/1, 0/65535 or 1-bit. ``instances`` are
integer ids from 1 to 2^32 - 1. Where two cells of different ids touch, a membrane
``membrane_width`` pixels wide is drawn between them, half of it taken from each cell
(:func:`instance_mask`); a cell next to 0 keeps its pixels (0 is already not cell). The kind is
always declared by the user, never guessed; a labels volume that does not fit its kind is rejected
with a hint at the kind it looks like.
"""
from __future__ import annotations

import numpy as np

KINDS = ("membrane", "cells", "instances")
DEFAULT_MEMBRANE_WIDTH = 2
MAX_ID = 2**32 - 1


def check_kind(kind: str, where: str = "labels kind") -> str:
    """``kind`` if it is one of :data:`KINDS`; ValueError naming ``where`` otherwise."""
    if kind not in KINDS:
        raise ValueError(f"{where}: unknown labels kind {kind!r}, expected one of {', '.join(KINDS)}")
    return kind


def check_membrane_width(width: int) -> int:
    """``width`` if it is an even integer >= 2 (each cell gives up ``width / 2`` pixels)."""
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 2 or width % 2:
        raise ValueError(f"membrane width must be an even number of pixels >= 2 (each of two touching cells "
                         f"gives up half of it), got {width!r}")
    return int(width)


def _values(array: np.ndarray, limit: int = 8) -> str:
    values = np.unique(array)
    shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values[:limit].tolist())
    return f"[{shown}{', ...] (' + str(len(values)) + ' distinct)' if len(values) > limit else ']'}"


def binary_foreground(labels: np.ndarray, path: object) -> np.ndarray:
    """Where binary labels are non-zero, as bool; ValueError (with a hint) unless they are 0/255,
    0/1, 0/65535 (0 and the dtype's maximum) or 1-bit."""
    if labels.dtype == np.bool_:
        return labels
    values = set(np.unique(labels).tolist())
    top = np.iinfo(labels.dtype).max if np.issubdtype(labels.dtype, np.unsignedinteger) else 255
    if not (values <= {0, 255} or values <= {0, 1} or values <= {0, top}):
        hint = ("; if these are instance ids (one integer per cell), declare the labels kind instances"
                if np.issubdtype(labels.dtype, np.integer) and len(values) > 2 else "")
        raise ValueError(f"{path}: labels must be binary (0/255 or 0/1), found values {_values(labels)}{hint}")
    return labels != 0


def check_instance_ids(labels: np.ndarray, path: object) -> np.ndarray:
    """Instance ids as uint32; ValueError for float, negative or too large ids."""
    if labels.dtype == np.bool_:
        return labels.astype(np.uint32)
    if not np.issubdtype(labels.dtype, np.integer):
        whole = np.issubdtype(labels.dtype, np.floating) and bool(np.all(np.isfinite(labels))) and \
            bool(np.all(labels == np.round(labels)))
        hint = "; they are whole numbers: save them as uint32" if whole else ""
        raise ValueError(f"{path}: {labels.dtype} labels, expected integer instance ids (uint8 to uint64)"
                         f"{hint}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        raise ValueError(f"{path}: negative instance id {lo}, expected ids 0 (not cell) to {MAX_ID}")
    if hi > MAX_ID:
        raise ValueError(f"{path}: instance id {hi} is above 2^32 - 1 = {MAX_ID}; renumber the ids "
                         "(skimage.segmentation.relabel_sequential)")
    return labels.astype(np.uint32, copy=False)


def instance_mask(ids: np.ndarray, membrane_width: int = DEFAULT_MEMBRANE_WIDTH) -> np.ndarray:
    """The cell mask (bool [H, W]) of one frame of instance ids (uint32, 0 = not cell).

    Pixels of id 0 are not cell. Where two different ids touch, ``membrane_width`` pixels of
    membrane are drawn, ``membrane_width / 2`` from each cell: the first from
    ``find_boundaries(ids, connectivity=1, mode="outer")`` (on the cells' side of a contact it marks
    the pixels of a cell that have a 4-neighbour of another id, so one pixel on each side; on the
    0 side of a cell's edge, pixels already not cell), the others by growing that line into the
    cells one 4-connected step at a time. A cell next to 0 keeps its edge pixels, so the instance
    labels of a binary mask's connected components (``skimage.measure.label``) give the mask back.
    (uint32 matters: find_boundaries' ``outer`` mode stands the dtype's maximum in for background,
    and with int64 ids its erosion overflows and marks pixels touching no other cell.)
    """
    ids = np.asarray(ids)
    # imported here: the command lines read this module's constants before anything heavy loads
    from scipy import ndimage as ndi
    from skimage.segmentation import find_boundaries

    if ids.ndim != 2 or ids.dtype != np.uint32:
        raise ValueError(f"expected one frame of uint32 ids [H, W], got {ids.dtype} {ids.shape}")
    cells = ids != 0
    membrane = find_boundaries(ids, connectivity=1, mode="outer") & cells
    steps = check_membrane_width(membrane_width) // 2 - 1
    if steps:
        membrane = ndi.binary_dilation(membrane, ndi.generate_binary_structure(2, 1), iterations=steps) & cells
    return cells & ~membrane


def cell_masks(labels: np.ndarray, kind: str, path: object,
               membrane_width: int = DEFAULT_MEMBRANE_WIDTH) -> np.ndarray:
    """The uint8 cell masks (N, H, W), 255 = cell, 0 = membrane, of a labels stack (N, H, W) of
    ``kind`` read from ``path`` (named in errors)."""
    check_kind(kind, str(path))
    if labels.ndim != 3:
        raise ValueError(f"{path}: labels of shape {labels.shape}, expected frames (N, H, W)")
    if kind == "instances":
        ids = check_instance_ids(labels, path)
        cell = np.stack([instance_mask(frame, membrane_width) for frame in ids])
    else:
        foreground = binary_foreground(labels, path)
        cell = foreground if kind == "membrane" else ~foreground
    return np.where(cell, np.uint8(255), np.uint8(0))
