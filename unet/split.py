"""Pair image and mask frames by name, split them 2:1 into train/val, lay out the case's folders.

Layout written by :func:`split_dataset` under ``out_dir``: ``train/image``, ``train/mask``,
``val/image``, ``val/mask``, ``test_imgs`` (frames keep their names, e.g. ``00003.png``) and
``split.csv`` (frame_id, subset, image, mask; paths relative to ``out_dir``; volume and index: the
labelled volume each frame comes from, as the extract stage's ``frames.csv`` lists it, and its index
in that volume; test frames are volume ``test``).

Several volumes: ``every_third`` applies per volume (frames 0, 3, 6... of each volume to val);
``random`` draws a third of all labelled frames.
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
SPLIT_COLUMNS = ["frame_id", "subset", "image", "mask", "volume", "index"]
FRAMES_CSV = "frames.csv"  # written by unet.frames.extract_pairs
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


def assign_by_volume(volumes: dict[str, str], mode: str = "every_third", seed: int = 0) -> dict[str, str]:
    """``{frame_id: "train" | "val"}`` for frames of several volumes (``{frame_id: volume}``):
    ``every_third`` applies :func:`assign_subsets`' rule per volume (frames sorted by id within
    each), ``random`` draws from all frames at once; a single volume splits as
    :func:`assign_subsets`. ValueError when train or val would be empty."""
    if mode not in MODES:
        raise ValueError(f"unknown split mode {mode!r}; expected one of {list(MODES)}")
    if len(volumes) < 3:
        raise ValueError(f"need at least 3 labelled frames for a 2:1 train/val split, got {len(volumes)}")
    if mode == "random" or len(set(volumes.values())) == 1:
        return assign_subsets(list(volumes), mode=mode, seed=seed)
    subsets = {}
    for volume in sorted(set(volumes.values())):
        ids = sorted(i for i, v in volumes.items() if v == volume)
        subsets.update({frame: "val" if k % 3 == 0 else "train" for k, frame in enumerate(ids)})
    if "train" not in subsets.values():
        raise ValueError(f"every third frame of each volume goes to val, which leaves no frame to train on with "
                         f"volumes of {sorted(set(volumes.values()))} of 1 frame each; use the random split")
    return subsets


def _volumes(frames: Path, stems: list[str]) -> dict[str, tuple[str, str]]:
    """``{frame_id: (volume, index)}`` from the extract stage's frames.csv; without one (frames
    extracted before it existed, or laid out by hand), one volume indexed in name order."""
    listing = frames / FRAMES_CSV
    if not listing.is_file():
        return {stem: ("0", str(i)) for i, stem in enumerate(sorted(stems))}
    table = pd.read_csv(listing, dtype=str, keep_default_na=False)
    found = dict(zip(table["frame"], zip(table["volume"], table["index"])))
    unlisted = sorted(set(stems) - found.keys())
    if unlisted:
        raise ValueError(f"{listing}: frames {_listed(unlisted)} are not listed")
    return {stem: found[stem] for stem in stems}


def _rows(pairs: list[tuple[str, Path, Path]], tests: dict[str, Path], subsets: dict[str, str],
          sources: dict[str, tuple[str, str]]) -> list[tuple[str, str, Path, Path | None, str, str]]:
    """(frame_id, subset, source image, source mask or None, volume, index) for every output frame."""
    rows: list[tuple[str, str, Path, Path | None, str, str]] = [
        (stem, subsets[stem], image, mask, *sources[stem]) for stem, image, mask in pairs
    ]
    rows += [(stem, "test", image, None, "test", str(i)) for i, (stem, image) in enumerate(sorted(tests.items()))]
    return rows


def _copy_rows(rows: list[tuple[str, str, Path, Path | None, str, str]], root: Path) -> pd.DataFrame:
    """Copy every row's files under ``root`` and return the split table (relative paths)."""
    for folder in set(LAYOUT.values()):
        (root / folder).mkdir(parents=True, exist_ok=True)
    records = []
    for frame_id, subset, image, mask, volume, index in rows:
        image_rel = f"{LAYOUT[(subset, 'image')]}/{image.name}"
        shutil.copy2(image, root / image_rel)
        mask_rel = ""
        if mask is not None:
            mask_rel = f"{LAYOUT[(subset, 'mask')]}/{mask.name}"
            shutil.copy2(mask, root / mask_rel)
        records.append({"frame_id": frame_id, "subset": subset, "image": image_rel,
                        "mask": mask_rel, "volume": volume, "index": index})
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
        logger.info("%s: no test frames (no test volume)", frames / "test")
    sources = _volumes(frames, [stem for stem, _, _ in pairs])
    subsets = assign_by_volume({stem: volume for stem, (volume, _) in sources.items()}, mode=mode, seed=seed)
    rows = _rows(pairs, tests, subsets, sources)
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
    missing = [c for c in SPLIT_COLUMNS[:4] if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}, expected {SPLIT_COLUMNS}")
    if "volume" not in table.columns:  # split before several volumes: one volume, frames in name order
        table["volume"] = np.where(table["subset"] == "test", "test", "0")
        table["index"] = table.groupby("volume")["frame_id"].rank(method="first").astype(int).sub(1).astype(str)
    return table[SPLIT_COLUMNS]
