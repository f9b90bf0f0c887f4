"""Volumes read lazily and segmentations written block by block.

Inputs (:func:`open_volume`): a TIFF stack (one or many pages, tiled or not), a folder of PNG/TIFF
frames (sorted by name, all one size), or a Zarr / OME-Zarr array ([z,] y, x). A :class:`Volume`
has a shape (Z, H, W) and reads any region of a section as uint8, converted as the extract stage
converts frames (:mod:`unet.frames`): uint16 scaled from its full range, integers within 0..255
cast, floats in [0, 1] or [0, 255] scaled or rounded, RGB with equal channels kept as one, other
RGB to luminance. Conversions that depend on the whole volume (its range, its channels) are found
by :func:`scan`, one section at a time, never the whole volume in memory.

Outputs (:func:`create_output`): an OME-Zarr (NGFF 0.5, zarr v3) whose image is the float32 cell
probability (z, y, x), with the labels ``mask`` (uint8, 255 = cell) and ``cells`` (uint32
instances); :func:`write_tiff` streams an array into a TIFF stack section by section.
"""
from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import tifffile
import zarr

from unet.formats import other_format

log = logging.getLogger(__name__)

MIN_SIDE = 64
FRAME_SUFFIXES = (".png", ".tif", ".tiff")
CONVERSIONS = ("none", "bool", "cast", "scale16", "float01", "float255")


class Volume:
    """A lazily read grey volume (Z, H, W); :meth:`read` returns uint8 regions."""

    def __init__(self, path: Path, kind: str, shape: tuple[int, int, int], dtype: np.dtype, rgb: bool,
                 source: Any, conversion: str | None = None, colour: str | None = None) -> None:
        self.path, self.kind, self.shape, self.dtype, self.rgb = path, kind, shape, np.dtype(dtype), rgb
        self._source = source
        self.conversion = conversion or ("none" if self.dtype == np.uint8 else None)
        self.colour = colour or ("grey" if not rgb else None)

    def __repr__(self) -> str:
        return f"Volume({self.path}, {self.kind}, shape={self.shape}, dtype={self.dtype}{', RGB' if self.rgb else ''})"

    def raw(self, z: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The stored pixels of a region: [h, w] or [h, w, C]."""
        return self._source(z, y0, y1, x0, x1)

    def read(self, z: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """uint8 [y1 - y0, x1 - x0] of section ``z`` (needs :func:`scan` for non-uint8 or RGB input)."""
        if self.conversion is None or self.colour is None:
            raise RuntimeError(f"{self.path}: scan() the volume before reading it ({self.dtype}"
                               f"{', RGB' if self.rgb else ''} needs a volume-wide conversion)")
        return to_grey(to_uint8(self.raw(z, y0, y1, x0, x1), self.conversion), self.colour)

    def section(self, z: int) -> np.ndarray:
        return self.read(z, 0, self.shape[1], 0, self.shape[2])

    def settings(self) -> dict[str, str]:
        """What :func:`open_volume` needs to read it again without a scan."""
        return {"conversion": self.conversion, "colour": self.colour}


def to_uint8(raw: np.ndarray, conversion: str) -> np.ndarray:
    """Pixels to uint8 by one of :data:`CONVERSIONS` (the formulas of :mod:`unet.frames`)."""
    if conversion == "none":
        return raw
    if conversion == "bool":
        return raw.astype(np.uint8) * np.uint8(255)
    if conversion == "cast":
        return raw.astype(np.uint8)
    if conversion == "scale16":
        return ((raw.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if conversion == "float01":
        return np.rint(raw.astype(np.float64) * 255.0).astype(np.uint8)
    if conversion == "float255":
        return np.rint(raw).astype(np.uint8)
    raise ValueError(f"unknown conversion {conversion!r}; expected one of {CONVERSIONS}")


def to_grey(image: np.ndarray, colour: str) -> np.ndarray:
    if colour == "grey" or image.ndim == 2:
        return image
    if colour == "equal":
        return np.ascontiguousarray(image[..., 0])
    return cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)


def scan(volume: Volume) -> Volume:
    """Decide the volume-wide conversion (from its value range) and colour handling (equal RGB
    channels or luminance), reading one section at a time; ValueError for pixels no rule covers.
    Logs a note for each lossy conversion, as the extract stage does."""
    if volume.conversion is not None and volume.colour is not None:
        return volume
    lo, hi, equal, finite = np.inf, -np.inf, True, True
    for z in range(volume.shape[0]):
        raw = volume.raw(z, 0, volume.shape[1], 0, volume.shape[2])
        if volume.rgb:
            equal = equal and bool((raw[..., 0] == raw[..., 1]).all() and (raw[..., 1] == raw[..., 2]).all())
        if volume.conversion is None:
            if raw.dtype.kind == "f" and not np.isfinite(raw).all():
                finite = False
                break
            lo, hi = min(lo, float(raw.min())), max(hi, float(raw.max()))
    if volume.conversion is None:
        volume.conversion = _conversion(volume, lo, hi, finite)
    if volume.colour is None:
        volume.colour = "equal" if equal else "luminance"
        note = ("RGB frames with equal channels, one channel kept" if equal
                else "RGB frames converted to grey with luminance weights")
        log.log(logging.INFO if equal else logging.WARNING, "%s: %s", volume.path, note)
    return volume


def _conversion(volume: Volume, lo: float, hi: float, finite: bool) -> str:
    dtype, path = volume.dtype, volume.path
    if dtype == np.bool_:
        return "bool"
    if dtype.kind in "iu":
        if lo >= 0 and hi <= 255:
            log.info("%s: %s pixels within 0..255, cast to uint8", path, dtype)
            return "cast"
        if dtype == np.uint16:
            log.warning("%s: uint16 pixels (range %d..%d) scaled to uint8 as x*255/65535", path, lo, hi)
            return "scale16"
        raise ValueError(f"{path}: {dtype} pixels span {lo:g}..{hi:g}, expected uint8, uint16 "
                         "or integers within 0..255")
    if dtype.kind == "f":
        if not finite:
            raise ValueError(f"{path}: float pixels contain NaN or infinity, expected values in [0, 1] or [0, 255]")
        if lo >= 0.0 and hi <= 1.0:
            log.warning("%s: %s pixels in [0, 1] scaled by 255 to uint8", path, dtype)
            return "float01"
        if lo >= 0.0 and hi <= 255.0:
            log.warning("%s: %s pixels in [0, 255] rounded to uint8", path, dtype)
            return "float255"
        raise ValueError(f"{path}: {dtype} pixels span {lo:g}..{hi:g}, expected values in [0, 1] or [0, 255]")
    raise ValueError(f"{path}: unsupported pixel type {dtype}, expected unsigned integers, floats or 1-bit")


# ---- opening ------------------------------------------------------------------------------------

def open_volume(path: Path | str, conversion: str | None = None, colour: str | None = None) -> Volume:
    """The volume at ``path`` (TIFF stack, folder of frames, Zarr/OME-Zarr), opened lazily.
    FileNotFoundError / ValueError naming the path and what was expected."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: input not found (expected a TIFF stack, a folder of frames or a Zarr array)")
    if path.is_dir():
        if (path / "zarr.json").is_file() or (path / ".zarray").is_file() or (path / ".zgroup").is_file():
            volume = _open_zarr(path)
        else:
            volume = _open_frames(path)
    else:
        volume = _open_tiff(path)
    _check_shape(volume)
    if conversion is not None:
        volume.conversion = conversion
    if colour is not None:
        volume.colour = colour
    return volume


def open_array(array: np.ndarray, name: str = "<array>") -> Volume:
    """An in-memory uint8 volume [Z, H, W] (or one frame [H, W]) as a :class:`Volume`."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 frames, got {array.dtype}")
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"{name}: expected frames [Z, H, W] or [H, W], got shape {array.shape}")
    return Volume(Path(name), "array", tuple(array.shape), array.dtype, False,
                  lambda z, y0, y1, x0, x1: array[z, y0:y1, x0:x1])


def _check_shape(volume: Volume) -> None:
    z, h, w = volume.shape
    if z < 1:
        raise ValueError(f"{volume.path}: no sections")
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"{volume.path}: frames are {h}x{w}, expected at least {MIN_SIDE}x{MIN_SIDE}")


def _sniff(path: Path) -> None:
    with path.open("rb") as f:
        head = f.read(8)
    if not head:
        raise ValueError(f"{path}: empty file, 0 bytes (expected a TIFF stack)")
    if not (head.startswith(b"II") or head.startswith(b"MM")):
        what = other_format(head) or "not a TIFF file"
        raise ValueError(f"{path}: not a readable TIFF stack ({what}; expected a TIFF stack, a folder of "
                         "frames or a Zarr array)")


def _open_tiff(path: Path) -> Volume:
    _sniff(path)
    try:
        tif = tifffile.TiffFile(path)
        if len(tif.series) != 1:
            shapes = ", ".join(str(tuple(s.shape)) for s in tif.series[:4]) or "none"
            raise ValueError(f"{len(tif.series)} image series ({shapes}), expected one stack of equal frames")
        series = tif.series[0]
        store = zarr.open(series.aszarr(), mode="r")
        axes = series.axes
    except (ValueError, OSError, tifffile.TiffFileError, KeyError, IndexError, struct.error) as exc:
        raise ValueError(f"{path}: not a readable TIFF stack ({exc})") from None
    shape = tuple(int(s) for s in store.shape)
    # colour: tifffile's samples axis S (last, or first for planar RGB); the last two others are y, x
    samples = axes.index("S") if "S" in axes and shape[axes.index("S")] in (3, 4) else None
    others = [i for i in range(len(shape)) if i != samples]
    stack = [i for i in others[:-2] if shape[i] > 1]
    if len(others) < 2 or len(stack) > 1:
        raise ValueError(f"{path}: a {len(shape)}-D image (axes {axes!r}, shape {shape}); expected a stack "
                         "of grey frames (z, y, x) or one frame (y, x), not a 4-D or multichannel volume")
    z_axis = stack[0] if stack else None

    def source(z: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        index = [0] * len(shape)
        index[others[-2]], index[others[-1]] = slice(y0, y1), slice(x0, x1)
        if z_axis is not None:
            index[z_axis] = z
        if samples is not None:
            index[samples] = slice(None)
        region = np.asarray(store[tuple(index)])
        return np.moveaxis(region, 0, -1) if samples is not None and samples < others[-2] else region

    spatial = (shape[z_axis] if z_axis is not None else 1, shape[others[-2]], shape[others[-1]])
    volume = Volume(path, "tiff", spatial, store.dtype, samples is not None, source)
    volume._file = tif  # keeps the file open while the volume lives
    return volume


def _png_size(path: Path) -> tuple[int, int] | None:
    with path.open("rb") as f:
        head = f.read(24)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
        return h, w
    return None


def _frame_size(path: Path) -> tuple[int, int]:
    size = _png_size(path) if path.suffix.lower() == ".png" else None
    if size is None:
        try:
            with tifffile.TiffFile(path) as tif:
                size = tuple(tif.pages[0].shape[:2])
        except Exception:
            image = _imread(path)
            size = image.shape[:2]
    return size


def _imread(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"{path}: not a readable image (expected PNG or TIFF frames)")
    if image.ndim == 3:  # OpenCV reads colour as BGR(A)
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return image


def _open_frames(path: Path) -> Volume:
    frames = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES
                    and not p.name.startswith("."))
    if not frames:
        raise ValueError(f"{path}: no PNG or TIFF frames in this folder (expected a TIFF stack, a folder of "
                         "frames or a Zarr array)")
    first = _imread(frames[0])
    if first.ndim == 3 and first.shape[2] not in (3, 4):
        raise ValueError(f"{frames[0]}: {first.shape[2]} channels, expected grey or RGB frames")
    for frame in frames[1:]:
        if _frame_size(frame) != first.shape[:2]:
            raise ValueError(f"{frame}: frame of {_frame_size(frame)}, but {frames[0].name} is "
                             f"{first.shape[:2]}; expected frames of one size")
    cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def source(z: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if z not in cache:
            image = _imread(frames[z])
            if image.shape != first.shape or image.dtype != first.dtype:
                raise ValueError(f"{frames[z]}: {image.dtype} frame of shape {image.shape}, but {frames[0].name} "
                                 f"is {first.dtype} {first.shape}; expected frames of one size and pixel type")
            cache[z] = image
            while len(cache) > 3:  # a section and its two neighbours
                cache.popitem(last=False)
        return cache[z][y0:y1, x0:x1]

    volume = Volume(path, "frames", (len(frames), *first.shape[:2]), first.dtype, first.ndim == 3, source)
    volume.files = frames
    return volume


def _open_zarr(path: Path) -> Volume:
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise ValueError(f"{path}: not a readable Zarr array or group ({exc})") from None
    axes = None
    if isinstance(node, zarr.Group):
        attrs = dict(node.attrs)
        multiscales = attrs.get("ome", attrs).get("multiscales")
        if not multiscales:
            raise ValueError(f"{path}: a Zarr group without OME-Zarr multiscales metadata; expected an "
                             "OME-Zarr image or a Zarr array")
        axes = [a["name"] if isinstance(a, dict) else a for a in multiscales[0].get("axes", [])] or None
        node = node[multiscales[0]["datasets"][0]["path"]]
    shape = tuple(int(s) for s in node.shape)
    axes = axes or (["z", "y", "x"][-len(shape):] if len(shape) <= 3 else None)
    # drop time/channel axes of length 1 (an OME-Zarr image is often t, c, z, y, x)
    keep = [i for i, s in enumerate(shape) if not (axes and axes[i] in ("t", "c") and s == 1)]
    spatial = tuple(shape[i] for i in keep)
    if len(spatial) not in (2, 3) or (axes and any(axes[i] in ("t", "c") for i in keep)):
        raise ValueError(f"{path}: array of shape {shape} (axes {axes}); expected grey frames (z, y, x) or "
                         "(y, x), not a 4-D or multichannel volume")
    index = tuple(0 if i not in keep else None for i in range(len(shape)))

    def source(z: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        region = iter([z, slice(y0, y1), slice(x0, x1)] if len(spatial) == 3 else [slice(y0, y1), slice(x0, x1)])
        return np.asarray(node[tuple(next(region) if i is None else i for i in index)])

    return Volume(path, "zarr", spatial if len(spatial) == 3 else (1, *spatial), node.dtype, False, source)


def input_files(volume: Volume) -> list[Path]:
    """The files whose content is the volume (for its digest)."""
    if volume.kind == "frames":
        return list(volume.files)
    if volume.kind == "zarr":
        return sorted(p for p in volume.path.rglob("*") if p.is_file())
    return [volume.path]


def content_digest(volume: Volume) -> str:
    """sha256 over the volume's files: names (relative) and bytes, read 1 MiB at a time."""
    h = hashlib.sha256()
    root = volume.path if volume.path.is_dir() else volume.path.parent
    for path in input_files(volume):
        h.update(str(path.relative_to(root)).encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# ---- outputs ------------------------------------------------------------------------------------

LABELS = {"mask": "uint8", "cells": "uint32"}


def create_output(path: Path, shape: tuple[int, int, int], chunks: tuple[int, int, int],
                  attributes: dict[str, Any]) -> zarr.Group:
    """A new OME-Zarr at ``path``: image ``0`` float32 cell probability, labels ``mask`` and
    ``cells``, all chunked by ``chunks``, ``attributes`` under the key ``segmentation``."""
    from ome_zarr.writer import write_label_metadata, write_multiscales_metadata

    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    datasets = [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]
    root.create_array("0", shape=shape, chunks=chunks, dtype="float32", fill_value=0.0)
    write_multiscales_metadata(root, datasets, axes="zyx", name="cell probability")
    labels = root.create_group("labels")
    for name, dtype in LABELS.items():
        group = labels.create_group(name)
        group.create_array("0", shape=shape, chunks=chunks, dtype=dtype, fill_value=0)
        write_multiscales_metadata(group, datasets, axes="zyx", name=name)
        write_label_metadata(labels, name, source={"image": "../../"})
    ome = dict(labels.attrs.get("ome", {}))
    labels.attrs["ome"] = {**ome, "version": "0.5", "labels": list(LABELS)}
    root.attrs["segmentation"] = attributes
    return root


def output_arrays(path: Path, mode: str = "r+") -> dict[str, zarr.Array]:
    """The arrays of :func:`create_output`: ``prob``, ``mask``, ``cells``."""
    root = zarr.open_group(str(path), mode=mode)
    return {"prob": root["0"], "mask": root["labels/mask/0"], "cells": root["labels/cells/0"]}


def write_tiff(path: Path, array: Any, dtype: str) -> None:
    """``array`` [Z, H, W] (anything indexable by section) into a TIFF stack at ``path``, one section in
    memory at a time, through a temporary file renamed into place (BigTIFF past 2 GiB)."""
    z, h, w = array.shape
    tmp = path.with_name(f".{path.name}.tmp")
    nbytes = z * h * w * np.dtype(dtype).itemsize

    def sections() -> Iterator[np.ndarray]:
        for i in range(z):
            yield np.asarray(array[i], dtype=dtype)

    try:
        tifffile.imwrite(tmp, data=sections(), shape=(z, h, w), dtype=dtype, photometric="minisblack",
                         bigtiff=nbytes > 2**31)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
