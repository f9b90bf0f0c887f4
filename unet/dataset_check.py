"""Checks a split folder against a recipe's input and describes the datasets training will read."""
from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np

from unet.data import read_grey, train_transforms
from unet.recipes import Recipe
from unet.split import read_split


def _check_pair(split_dir: Path, image: str, mask: str) -> tuple[int, int]:
    img = read_grey(split_dir / image)
    msk = read_grey(split_dir / mask)
    if img.shape != msk.shape:
        raise ValueError(f"{split_dir / image}: image is {img.shape}, its mask {mask} is {msk.shape}")
    values = np.unique(msk)
    if not set(values.tolist()) <= {0, 255}:
        raise ValueError(f"{split_dir / mask}: mask must be 0/255, found values {values[:8].tolist()}")
    return img.shape


def describe_split(split_dir: Path | str, *, image_size: int, input_mode: str, in_channels: int,
                   augmentation: str) -> dict:
    """Pairs (paths relative to ``split_dir``), counts, the frame shape (``frame_shape``; None when
    frames of several volumes differ in size, ``frame_shapes`` lists the sizes) and the network
    input; ValueError when a subset is empty, a pair is inconsistent, or frames are smaller than a
    crop recipe's crop."""
    split_dir = Path(split_dir)
    table = read_split(split_dir)
    subsets = {s: table[table["subset"] == s] for s in ("train", "val", "test")}
    for name in ("train", "val"):
        if subsets[name].empty:
            raise ValueError(f"{split_dir / 'split.csv'}: the {name} subset is empty")
    shapes = {_check_pair(split_dir, r.image, r.mask) for s in ("train", "val") for r in subsets[s].itertuples()}
    h, w = min(shapes, key=min)
    if input_mode == "crop" and min(h, w) < image_size:
        raise ValueError(f"{split_dir}: frames are {h}x{w}, smaller than the recipe's crop of {image_size}")
    recipe = Recipe(name="check", image_size=image_size, input_mode=input_mode, in_channels=in_channels,
                    augmentation=augmentation)
    network_input = [in_channels, image_size, image_size]
    return {
        "frame_shape": [int(h), int(w)] if len(shapes) == 1 else None,
        "frame_shapes": [[int(a), int(b)] for a, b in sorted(shapes)],
        "network_input": network_input,
        "input_mode": input_mode,
        "augmentation": A.to_dict(train_transforms(recipe)),
        "train": [[r.image, r.mask] for r in subsets["train"].itertuples()],
        "val": [[r.image, r.mask] for r in subsets["val"].itertuples()],
        "test": [r.image for r in subsets["test"].itertuples()],
    }
