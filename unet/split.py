"""Deterministic 2:1 train/val split of the labelled frames, in the case's folder layout."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

MODES = ("every_third", "random")
SUBSET_DIRS = {"train": ("train/image", "train/mask"), "val": ("val/image", "val/mask")}


def pair_by_stem(image_dir: Path | str, mask_dir: Path | str) -> list[tuple[str, Path, Path]]:
    """(stem, image, mask) for every ``*.png`` stem present in both folders, sorted by stem;
    ValueError when the folders hold different stems or no PNG at all."""
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    images = {p.stem: p for p in image_dir.glob("*.png")}
    masks = {p.stem: p for p in mask_dir.glob("*.png")}
    if not images:
        raise ValueError(f"{image_dir}: no PNG frames found")
    if images.keys() != masks.keys():
        only_img = sorted(images.keys() - masks.keys())[:5]
        only_msk = sorted(masks.keys() - images.keys())[:5]
        raise ValueError(f"{image_dir} and {mask_dir} do not pair by file name: images without mask "
                         f"{only_img}, masks without image {only_msk}")
    return [(stem, images[stem], masks[stem]) for stem in sorted(images)]


def assign_subsets(frame_ids: Sequence[str], mode: str = "every_third", seed: int = 0) -> dict[str, str]:
    """{frame id: "train" | "val"}, 2:1. ``every_third``: sorted position 0, 3, 6, ... to val (the
    case); ``random``: a seeded choice of round(n/3) frames, independent of the input order."""
    if mode not in MODES:
        raise ValueError(f"unknown split mode {mode!r}; expected one of {list(MODES)}")
    ids = sorted(frame_ids)
    if len(ids) < 3:
        raise ValueError(f"need at least 3 labelled frames for a 2:1 train/val split, got {len(ids)}")
    if mode == "every_third":
        val = set(ids[::3])
    else:
        rng = np.random.default_rng(seed)
        val = set(rng.choice(ids, size=max(1, round(len(ids) / 3)), replace=False).tolist())
    return {i: ("val" if i in val else "train") for i in ids}


def split_dataset(frames_dir: Path | str, out_dir: Path | str, mode: str = "every_third",
                  seed: int = 0) -> pd.DataFrame:
    """Copy extracted frames (``images/``, ``masks/``, ``test/``) into train/{image,mask},
    val/{image,mask} and test_imgs under ``out_dir``; write and return ``split.csv``."""
    frames_dir, out_dir = Path(frames_dir), Path(out_dir)
    pairs = pair_by_stem(frames_dir / "images", frames_dir / "masks")
    subsets = assign_subsets([stem for stem, _, _ in pairs], mode=mode, seed=seed)
    rows = []
    for stem, image, mask in pairs:
        subset = subsets[stem]
        image_rel, mask_rel = (f"{d}/{stem}.png" for d in SUBSET_DIRS[subset])
        rows.append({"frame_id": stem, "subset": subset, "image": image_rel, "mask": mask_rel})
        for src, rel in ((image, image_rel), (mask, mask_rel)):
            (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out_dir / rel)
    (out_dir / "test_imgs").mkdir(parents=True, exist_ok=True)
    for test in sorted((frames_dir / "test").glob("*.png")):
        shutil.copy2(test, out_dir / "test_imgs" / test.name)
        rows.append({"frame_id": test.stem, "subset": "test", "image": f"test_imgs/{test.name}", "mask": ""})
    order = {"train": 0, "val": 1, "test": 2}
    table = pd.DataFrame(rows, columns=["frame_id", "subset", "image", "mask"])
    table = table.sort_values(["subset", "frame_id"], key=lambda c: c.map(order) if c.name == "subset" else c)
    table = table.reset_index(drop=True)
    table.to_csv(out_dir / "split.csv", index=False)
    return table


def read_split(out_dir: Path | str) -> pd.DataFrame:
    """split.csv of ``out_dir`` with frame ids as strings (leading zeros kept), empty test masks."""
    path = Path(out_dir) / "split.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split table not found")
    table = pd.read_csv(path, dtype={"frame_id": str, "subset": str, "image": str, "mask": str})
    table["mask"] = table["mask"].fillna("")
    return table
