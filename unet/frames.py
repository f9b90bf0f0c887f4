"""Read ISBI-style TIFF stacks into uint8 frames, validate image/label pairs, write PNG frames.

:func:`extract_pairs` is the extract stage: any number of (image, labels, kind) pairs, each a TIFF
stack, a folder of frames or a Zarr array, their labels converted to cell masks by their declared
kind (:mod:`unet.labels`), plus an optional test volume.

Every reader returns uint8 ``(N, H, W)``. Conversions (16-bit, float, RGB, 1-bit) are noted on this
module's logger, naming the file. Unreadable or unsuitable files raise ``FileNotFoundError`` or
``ValueError`` with a one-line message that starts with the path; nothing from inside tifffile leaks.
"""
from __future__ import annotations

import logging
import os
import re
import struct
import threading
import zlib
from pathlib import Path
from typing import Any, Union

import cv2
import numpy as np
import pandas as pd
import tifffile

from unet.formats import other_format
from unet.labels import DEFAULT_MEMBRANE_WIDTH, cell_masks

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

MIN_FRAME_SIDE = 16
MAX_FRAMES = 100_000  # frame names are 5 digits; more would break name order
FRAME_NAME = re.compile(r"^\d{5}\.png$")

# What tifffile 2025/2026 raised on truncated, mis-named and byte-corrupted files (fuzzed with
# random byte flips): TiffFileError is a ValueError; the others come from its header parsing,
# decoders and array assembly. MemoryError is a header claiming a huge image (see _check_size).
_TIFF_READ_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, struct.error, zlib.error, KeyError, IndexError, TypeError, ZeroDivisionError,
    RuntimeError, AssertionError, NotImplementedError, EOFError, MemoryError,
)
# tifffile logs (instead of raising) when the IFD chain is broken, then returns the pages before the
# break: a file cut at a page boundary would otherwise read as a shorter stack without any error, and
# a circular chain makes its page iterator loop forever. These records are the only signal, so the
# checks rely on the "tifffile" logger being enabled for ERROR (the default).
_TIFFFILE_FATAL_LOGS = (
    "invalid page offset", "invalid offset to page", "corrupted tag list", "invalid next page",
    "circular reference", "corrupted file", "failed to reshape",
)
# Deflate cannot expand data more than ~1032x; a header claiming more pixels is corrupt.
_MAX_COMPRESSION_RATIO = 1100


class _TiffErrorLog(logging.Handler):
    """Collects tifffile ERROR records emitted by the current thread."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the message if it comes from this handler's thread."""
        if record.thread == self.thread:
            self.messages.append(record.getMessage())

    def fatal(self) -> str | None:
        """The first message that means the page chain is broken, if any."""
        for msg in self.messages:
            if any(marker in msg for marker in _TIFFFILE_FATAL_LOGS):
                return msg
        return None


def _error_name(exc: BaseException) -> str:
    """``TiffFileError``, ``struct.error``, ``zlib.error``...: a readable exception name."""
    name = type(exc).__name__
    return f"{type(exc).__module__}.{name}" if name == "error" else name


def _unreadable(path: Path, reason: str) -> ValueError:
    """The ValueError for a file that is not a usable TIFF stack."""
    reason = " ".join(str(reason).split())[:160] or "unknown error"
    return ValueError(f"{path}: not a readable TIFF stack ({reason})")


def _check_exists(path: Path) -> None:
    """FileNotFoundError / ValueError unless ``path`` is an existing regular file."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    if not path.is_file():
        raise ValueError(f"{path}: not a file, expected a TIFF stack")


class _Rejected(Exception):
    """A structural problem found while the TIFF is open (reason text only)."""


def _check_size(path: Path, series: Any) -> None:
    """Reject headers that declare more pixel bytes than the file could hold."""
    file_size = path.stat().st_size
    keyframe = series.keyframe
    compressed = int(getattr(keyframe, "compression", 1)) != 1
    limit = file_size * (_MAX_COMPRESSION_RATIO if compressed else 1)
    stored = int(series.size) * int(getattr(keyframe, "bitspersample", 8)) // 8  # 1-bit is packed
    if stored > limit:
        raise _Rejected(f"header declares {stored} bytes of pixels, file has {file_size} bytes; "
                        "truncated or corrupt")


def _read_series(tif: tifffile.TiffFile, path: Path,
                 errors: _TiffErrorLog) -> tuple[np.ndarray, str]:
    """The pixels and axes of the file's single image series."""
    len(tif.pages)  # index the page chain first: a circular chain makes tif.series loop forever
    fatal = errors.fatal()
    if fatal:
        raise _Rejected(f"broken page chain, truncated or corrupt; tifffile: {fatal}")
    series = tif.series
    if not series:
        raise _Rejected("no image data")
    if len(series) > 1:
        shapes = ", ".join(str(tuple(s.shape)) for s in series[:4])
        raise _Rejected(f"{len(series)} image series of different shapes or types ({shapes}), "
                        "expected one stack of equal frames")
    _check_size(path, series[0])
    return series[0].asarray(), str(series[0].axes)


def _sniff(path: Path) -> None:
    """_Rejected for an empty file or one that starts like another known format."""
    with path.open("rb") as f:
        head = f.read(8)
    if not head:
        raise _Rejected("empty file, 0 bytes")
    name = other_format(head)
    if name is not None:
        raise _Rejected(f"the file is {name}, not a TIFF; renamed?")


def _read_tiff(path: Path) -> tuple[np.ndarray, str]:
    """The first (and only) image series of the file and its tifffile axes string."""
    try:
        _sniff(path)
    except _Rejected as exc:
        raise _unreadable(path, str(exc)) from None
    errors = _TiffErrorLog()
    tiff_logger = logging.getLogger("tifffile")
    tiff_logger.addHandler(errors)
    try:
        with tifffile.TiffFile(path) as tif:
            array, axes = _read_series(tif, path, errors)
    except _Rejected as exc:
        raise _unreadable(path, str(exc)) from None
    except PermissionError:
        raise
    except OSError as exc:
        raise _unreadable(path, f"{_error_name(exc)}: {exc.strerror or exc}") from None
    except _TIFF_READ_ERRORS as exc:
        raise _unreadable(path, f"{_error_name(exc)}: {exc}") from None
    finally:
        tiff_logger.removeHandler(errors)
    fatal = errors.fatal()
    if fatal:
        raise _unreadable(path, f"broken page chain, truncated or corrupt; tifffile: {fatal}")
    return array, axes


def _as_frames(array: np.ndarray, axes: str, path: Path) -> np.ndarray:
    """Reshape to (N, H, W) or (N, H, W, C) colour; ValueError for other layouts."""
    if "S" in axes and len(axes) == array.ndim and axes.index("S") != array.ndim - 1:
        # tifffile.imwrite stores a (3|4, H, W) array as planar RGB unless told otherwise
        logger.warning("%s: planar RGB (axes %r), read as colour; if these are grey frames, "
                       "write them with photometric='minisblack'", path, axes)
        array = np.moveaxis(array, axes.index("S"), -1)
        axes = axes.replace("S", "") + "S"
    # colour: tifffile names a samples axis "S"; without axes, a last axis of 3 or 4 is colour
    samples_last = axes.endswith("S") if len(axes) == array.ndim else True
    colour = array.ndim in (3, 4) and array.shape[-1] in (3, 4) and samples_last
    if array.ndim == 2 or (array.ndim == 3 and colour):
        array = array[None]
    elif not (array.ndim == 3 or (array.ndim == 4 and colour)):
        raise ValueError(f"{path}: unsupported stack layout {tuple(array.shape)} (axes {axes!r}); "
                         "expected frames (N, H, W), (H, W) or RGB/RGBA frames")
    n, h, w = array.shape[:3]
    if n == 0 or n > MAX_FRAMES:
        raise ValueError(f"{path}: {n} frames, expected 1..{MAX_FRAMES}")
    if min(h, w) < MIN_FRAME_SIDE:
        raise ValueError(f"{path}: frames are {h}x{w}, expected at least "
                         f"{MIN_FRAME_SIDE}x{MIN_FRAME_SIDE}")
    return array


def _read_stack(path: PathLike) -> tuple[np.ndarray, Path]:
    """The file's frames in their stored dtype: (N, H, W) or (N, H, W, C)."""
    path = Path(path)
    _check_exists(path)
    array, axes = _read_tiff(path)
    return _as_frames(array, axes, path), path


def _int_to_uint8(array: np.ndarray, path: Path) -> np.ndarray:
    """Integer pixels to uint8: cast if within 0..255, uint16 scaled from its full range."""
    lo, hi = int(array.min()), int(array.max())
    if lo >= 0 and hi <= 255:
        logger.info("%s: %s pixels within 0..255, cast to uint8", path, array.dtype)
        return array.astype(np.uint8)
    if array.dtype == np.uint16:
        logger.warning("%s: uint16 pixels (range %d..%d) scaled to uint8 as x*255/65535",
                       path, lo, hi)
        return ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    raise ValueError(f"{path}: {array.dtype} pixels span {lo}..{hi}, expected uint8, uint16 "
                     "or integers within 0..255")


def _float_to_uint8(array: np.ndarray, path: Path) -> np.ndarray:
    """Float pixels to uint8: [0, 1] scaled by 255, [0, 255] rounded, anything else rejected."""
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: float pixels contain NaN or infinity, expected values in [0, 1] "
                         "or [0, 255]")
    lo, hi = float(array.min()), float(array.max())
    if lo >= 0.0 and hi <= 1.0:
        logger.warning("%s: %s pixels in [0, 1] scaled by 255 to uint8", path, array.dtype)
        return np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    if lo >= 0.0 and hi <= 255.0:
        logger.warning("%s: %s pixels in [0, 255] rounded to uint8", path, array.dtype)
        return np.rint(array).astype(np.uint8)
    raise ValueError(f"{path}: {array.dtype} pixels span {lo:g}..{hi:g}, expected values in "
                     "[0, 1] or [0, 255]")


def _to_uint8(array: np.ndarray, path: Path) -> np.ndarray:
    """Any supported pixel type to uint8, noting lossy conversions."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        logger.warning("%s: 1-bit pixels mapped to 0/255", path)
        return array.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(array.dtype, np.integer):
        return _int_to_uint8(array, path)
    if np.issubdtype(array.dtype, np.floating):
        return _float_to_uint8(array, path)
    raise ValueError(f"{path}: unsupported pixel type {array.dtype}, expected unsigned integers, "
                     "floats or 1-bit")


def _equal_channels(array: np.ndarray) -> bool:
    """Whether the R, G and B channels of (N, H, W, C) are identical."""
    return bool((array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all())


def _to_grey(array: np.ndarray, path: Path) -> np.ndarray:
    """(N, H, W, C) uint8 colour to (N, H, W) grey; grey input unchanged."""
    if array.ndim == 3:
        return array
    if array.shape[-1] == 4:
        logger.info("%s: alpha channel ignored", path)
    if _equal_channels(array):
        logger.info("%s: RGB frames with equal channels, one channel kept", path)
        return np.ascontiguousarray(array[..., 0])
    logger.warning("%s: RGB frames converted to grey with luminance weights", path)
    rgb = array[..., :3]
    return np.stack([cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in rgb])


def read_volume(path: PathLike) -> np.ndarray:
    """A TIFF stack (single- or multi-page, any supported pixel type) as uint8 (N, H, W)."""
    array, path = _read_stack(path)
    return _to_grey(_to_uint8(array, path), path)


def _distinct_values(array: np.ndarray) -> np.ndarray:
    """Sorted distinct values of ``array`` (fast path for 8-bit)."""
    if array.dtype == np.uint8:
        return np.flatnonzero(np.bincount(array.ravel(), minlength=256))
    return np.unique(array)


def _format_values(values: np.ndarray, limit: int = 8) -> str:
    """``[0, 3, 7, ...] (N distinct)`` for an error message."""
    shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values[:limit].tolist())
    more = f", ...] ({len(values)} distinct)" if len(values) > limit else "]"
    return f"[{shown}{more}"


def _single_channel(array: np.ndarray, path: PathLike) -> np.ndarray:
    """Label frames (N, H, W), or (N, H, W, C) colour ones with equal channels, as (N, H, W)."""
    if array.ndim == 4:
        if not _equal_channels(array):
            raise ValueError(f"{path}: labels are colour frames with differing channels, "
                             "expected single-channel labels")
        array = np.ascontiguousarray(array[..., 0])
    return array


def read_label_values(path: PathLike) -> np.ndarray:
    """The stored values of a label volume (N, H, W), unconverted: a TIFF stack (read as
    :func:`read_labels` reads it), a folder of frames or a Zarr array (:mod:`unet.volume_io`)."""
    path = Path(path)
    if path.is_dir():
        from unet.volume_io import open_volume

        volume = open_volume(path)
        _, h, w = volume.shape
        array = np.stack([np.asarray(volume.raw(z, 0, h, 0, w)) for z in range(volume.shape[0])])
    else:
        array, path = _read_stack(path)
    return _single_channel(array, path)


def read_image_volume(path: PathLike) -> np.ndarray:
    """uint8 (N, H, W) frames of a TIFF stack (:func:`read_volume`), a folder of PNG/TIFF frames
    or a Zarr / OME-Zarr array (:func:`unet.volume_io.open_volume`, converted the same way)."""
    path = Path(path)
    if not path.is_dir():
        return read_volume(path)
    from unet.volume_io import open_volume, scan

    volume = scan(open_volume(path))
    return np.stack([volume.section(z) for z in range(volume.shape[0])])


def read_labels(path: PathLike) -> np.ndarray:
    """A binary label stack as uint8 (N, H, W) in {0, 255}; 0/1 labels are mapped to 0/255."""
    array, path = _read_stack(path)
    array = _single_channel(array, path)
    values = _distinct_values(array)
    as_set = set(values.tolist())
    top = np.iinfo(array.dtype).max if np.issubdtype(array.dtype, np.unsignedinteger) else 255
    if top > 255 and top in as_set and as_set <= {0, top}:  # e.g. uint16 masks saved as 0/65535
        logger.info("%s: labels 0/%d mapped to 0/255", path, top)
        as_set = {0, 255}
    if not (as_set <= {0, 255} or as_set <= {0, 1}):
        hint = ("; if these are instance ids (one integer per cell), declare the labels kind instances"
                if np.issubdtype(array.dtype, np.integer) and len(values) > 2 else "")
        raise ValueError(f"{path}: labels must be binary (0/255 or 0/1), "
                         f"found values {_format_values(values)}{hint}")
    if as_set & {1} and not as_set & {255}:
        logger.info("%s: labels 0/1 mapped to 0/255", path)
    return np.where(array != 0, np.uint8(255), np.uint8(0))


def check_pair(volume: np.ndarray, labels: np.ndarray, volume_path: PathLike,
               labels_path: PathLike) -> None:
    """ValueError unless the image and label stacks have the same frame count and frame size."""
    if volume.ndim != 3 or labels.ndim != 3 or volume.shape != labels.shape:
        raise ValueError(f"{volume_path} has shape {tuple(volume.shape)} but {labels_path} has "
                         f"shape {tuple(labels.shape)}; expected the same frame count and size")


def _write_png(frame: np.ndarray, path: Path) -> None:
    """Encode one frame as PNG and put it at ``path`` atomically."""
    ok, buffer = cv2.imencode(".png", frame)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(buffer.tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_frames(volume: np.ndarray, out_dir: PathLike, prefix: str = "") -> list[Path]:
    """One PNG per frame (00000.png, 00001.png, ..., after ``prefix``) in ``out_dir``; stale
    numbered frames of the same prefix removed."""
    if volume.ndim != 3 or volume.dtype != np.uint8:
        raise ValueError(f"volume must be uint8 (N, H, W), got {volume.dtype} {tuple(volume.shape)}")
    if not 0 < len(volume) <= MAX_FRAMES:
        raise ValueError(f"volume has {len(volume)} frames, expected 1..{MAX_FRAMES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{prefix}{i:05d}.png" for i in range(len(volume))]
    for frame, path in zip(volume, paths):
        _write_png(np.ascontiguousarray(frame), path)
    keep = {p.name for p in paths}
    numbered = FRAME_NAME if not prefix else re.compile(rf"^{re.escape(prefix)}\d{{5}}\.png$")
    stale = sorted(p for p in out.iterdir() if numbered.match(p.name) and p.name not in keep)
    for p in stale:
        p.unlink()
    if stale:
        logger.info("%s: removed %d stale frames from an earlier run", out, len(stale))
    return paths


def volume_prefix(index: int, count: int) -> str:
    """The frame-name prefix of the ``index``-th of ``count`` labelled volumes: none for a single
    volume (``00000.png``, as ever), else ``v0-``, ``v1-``... zero-padded so names sort by volume."""
    return "" if count == 1 else f"v{index:0{len(str(count - 1))}d}-"


def read_pair(pair: dict[str, Any], membrane_width: int = DEFAULT_MEMBRANE_WIDTH) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 frames and cell masks (255 = cell) of one ``{"image", "labels", "kind"}`` pair,
    checked to match in frame count and size."""
    images = read_image_volume(pair["image"])
    masks = cell_masks(read_label_values(pair["labels"]), pair["kind"], pair["labels"], membrane_width)
    check_pair(images, masks, pair["image"], pair["labels"])
    return images, masks


FRAMES_CSV = "frames.csv"  # frame, volume, index, image, labels, kind: where each extracted frame comes from


def extract_pairs(pairs: list[dict[str, Any]], test_volume: PathLike | None, out_dir: PathLike,
                  membrane_width: int = DEFAULT_MEMBRANE_WIDTH) -> dict[str, Any]:
    """Validate every (image, labels, kind) pair and the optional test volume, then write
    out_dir/images, out_dir/masks (255 = cell, converted from each pair's labels kind), out_dir/test
    PNGs and out_dir/frames.csv (each labelled frame's source volume and index in it)."""
    if not pairs:
        raise ValueError("no (image, labels) pairs to extract")
    volumes = [read_pair(pair, membrane_width) for pair in pairs]
    test = None if test_volume is None else read_image_volume(test_volume)
    out = Path(out_dir)
    rows, described = [], []
    for k, (pair, (images, masks)) in enumerate(zip(pairs, volumes)):
        prefix = volume_prefix(k, len(pairs))
        names = [p.stem for p in write_frames(images, out / "images", prefix)]
        write_frames(masks, out / "masks", prefix)
        rows += [{"frame": name, "volume": k, "index": i, "image": str(pair["image"]),
                  "labels": str(pair["labels"]), "kind": pair["kind"]} for i, name in enumerate(names)]
        described.append({"image": str(pair["image"]), "labels": str(pair["labels"]), "kind": pair["kind"],
                          "frames": int(len(images)), "frame_shape": [int(images.shape[1]), int(images.shape[2])],
                          "prefix": prefix})
    if test is not None:
        write_frames(test, out / "test")
    else:
        (out / "test").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["frame", "volume", "index", "image", "labels", "kind"]).to_csv(
        out / FRAMES_CSV, index=False)
    return {
        "train_frames": len(rows),
        "test_frames": 0 if test is None else int(len(test)),
        "frame_shape": described[0]["frame_shape"],
        "test_frame_shape": None if test is None else [int(test.shape[1]), int(test.shape[2])],
        "volumes": described,
        "membrane_width": membrane_width,
    }


def extract_volumes(train_volume: PathLike, train_labels: PathLike, test_volume: PathLike | None,
                    out_dir: PathLike, labels_kind: str = "membrane") -> dict[str, Any]:
    """:func:`extract_pairs` of one stack and its labels (ISBI: binary ``membrane`` labels)."""
    return extract_pairs([{"image": train_volume, "labels": train_labels, "kind": labels_kind}], test_volume,
                         out_dir)
