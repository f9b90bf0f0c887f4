"""Pair image and mask frames by name, split them 2:1 into train/val, lay out the case's folders.

Layout written by :func:`split_dataset` under ``out_dir``: ``train/image``, ``train/mask``,
``val/image``, ``val/mask``, ``test_imgs`` (frames keep their names, e.g. ``00003.png``) and
``split.csv`` (frame_id, subset, image, mask; paths relative to ``out_dir``).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

MODES = ("every_third", "random")
SPLIT_CSV = "split.csv"
SPLIT_COLUMNS = ["frame_id", "subset", "image", "mask"]
LAYOUT = {  # (subset, kind) -> folder under out_dir
    ("train", "image"): "train/image",
    ("train", "mask"): "train/mask",
    ("val", "image"): "val/image",
    ("val", "mask"): "val/mask",
    ("test", "image"): "test_imgs",
}
_TOP_LEVEL = ("train", "val", "test_imgs")
_MAX_LISTED = 5


def _png_by_stem(folder: Path) -> dict[str, Path]:
    """The ``*.png`` files of ``folder`` keyed by stem; FileNotFoundError if it is missing."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found")
    return {p.stem: p for p in folder.iterdir() if p.suffix == ".png" and p.is_file()}


def _listed(stems: Sequence[str]) -> str:
    """Up to five stems and how many there are, for an error message."""
    shown = sorted(stems)[:_MAX_LISTED]
    more = ", ..." if len(stems) > _MAX_LISTED else ""
    return f"{len(stems)} ({', '.join(shown)}{more})"


def pair_by_stem(image_dir: PathLike, mask_dir: PathLike) -> list[tuple[str, Path, Path]]:
    """(stem, image, mask) for every PNG name present in both folders, sorted by stem."""
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    images, masks = _png_by_stem(image_dir), _png_by_stem(mask_dir)
    for folder, found in ((image_dir, images), (mask_dir, masks)):
        if not found:
            raise ValueError(f"{folder}: no .png frames found")
    only_images, only_masks = images.keys() - masks.keys(), masks.keys() - images.keys()
    if only_images or only_masks:
        raise ValueError(f"{image_dir} and {mask_dir} hold different frame names: only images "
                         f"{_listed(list(only_images))}, only masks {_listed(list(only_masks))}")
    return [(stem, images[stem], masks[stem]) for stem in sorted(images)]


def assign_subsets(frame_ids: Sequence[str], mode: str = "every_third",
                   seed: int = 0) -> dict[str, str]:
    """``{frame_id: "train" | "val"}``: a 2:1 split, independent of the order of ``frame_ids``."""
    if mode not in MODES:
        raise ValueError(f"unknown split mode {mode!r}; expected one of {list(MODES)}")
    ids = sorted(str(i) for i in frame_ids)
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"frame ids must be unique, repeated: {dupes[:_MAX_LISTED]}")
    if len(ids) < 3:
        raise ValueError(f"need at least 3 labelled frames for a 2:1 train/val split, got {len(ids)}")
    if mode == "every_third":
        val = {ids[i] for i in range(0, len(ids), 3)}
    else:
        n_val = max(1, round(len(ids) / 3))
        picks = np.random.default_rng(seed).choice(len(ids), size=n_val, replace=False)
        val = {ids[int(i)] for i in picks}
    return {i: "val" if i in val else "train" for i in ids}


def _rows(pairs: list[tuple[str, Path, Path]], tests: dict[str, Path],
          subsets: dict[str, str]) -> list[tuple[str, str, Path, Path | None]]:
    """(frame_id, subset, source image, source mask or None) for every output frame."""
    rows: list[tuple[str, str, Path, Path | None]] = [
        (stem, subsets[stem], image, mask) for stem, image, mask in pairs
    ]
    rows += [(stem, "test", image, None) for stem, image in sorted(tests.items())]
    return rows


def _copy_rows(rows: list[tuple[str, str, Path, Path | None]], root: Path) -> pd.DataFrame:
    """Copy every row's files under ``root`` and return the split table (relative paths)."""
    for folder in set(LAYOUT.values()):
        (root / folder).mkdir(parents=True, exist_ok=True)
    records = []
    for frame_id, subset, image, mask in rows:
        image_rel = f"{LAYOUT[(subset, 'image')]}/{image.name}"
        shutil.copy2(image, root / image_rel)
        mask_rel = ""
        if mask is not None:
            mask_rel = f"{LAYOUT[(subset, 'mask')]}/{mask.name}"
            shutil.copy2(mask, root / mask_rel)
        records.append({"frame_id": frame_id, "subset": subset, "image": image_rel,
                        "mask": mask_rel})
    table = pd.DataFrame.from_records(records, columns=SPLIT_COLUMNS)
    return table.sort_values(["subset", "frame_id"], kind="stable").reset_index(drop=True)


def _publish(staging: Path, out: Path) -> None:
    """Replace out_dir's layout folders and split.csv with the staged ones."""
    for name in _TOP_LEVEL:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(staging / name, target)
    os.replace(staging / SPLIT_CSV, out / SPLIT_CSV)


def split_dataset(frames_dir: PathLike, out_dir: PathLike, mode: str = "every_third",
                  seed: int = 0) -> pd.DataFrame:
    """Split extracted frames (images/, masks/, test/) into the case's train/val/test layout."""
    frames = Path(frames_dir)
    pairs = pair_by_stem(frames / "images", frames / "masks")
    tests = _png_by_stem(frames / "test")
    if not tests:
        logger.warning("%s: no test frames", frames / "test")
    subsets = assign_subsets([stem for stem, _, _ in pairs], mode=mode, seed=seed)
    rows = _rows(pairs, tests, subsets)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Build the whole layout aside, then swap it in: a failed copy leaves the previous split intact
    # and a re-split never keeps frames from an earlier assignment.
    staging = Path(tempfile.mkdtemp(prefix=".split-", dir=out))
    try:
        table = _copy_rows(rows, staging)
        table.to_csv(staging / SPLIT_CSV, index=False)
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    counts = table["subset"].value_counts().to_dict()
    logger.info("%s: split %s (seed %d): %s", out, mode, seed, counts)
    return table


def read_split(out_dir: PathLike) -> pd.DataFrame:
    """The split table written by :func:`split_dataset` (frame ids as strings, empty test masks)."""
    path = Path(out_dir) / SPLIT_CSV
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in SPLIT_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}, expected {SPLIT_COLUMNS}")
    return table[SPLIT_COLUMNS]
