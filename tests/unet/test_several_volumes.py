"""Several labelled volumes of different frame sizes: extraction, the split per volume, the datasets
description, neighbouring sections within a volume, and scores made frame by frame."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from unet.data import central_crops, section_paths, volume_of
from unet.dataset_check import describe_split
from unet.evaluate import native_scores
from unet.frames import extract_pairs
from unet.metrics import confusion_counts, confusion_scores, segmentation_scores
from unet.split import assign_by_volume, assign_subsets, split_dataset


def _volume(tmp_path: Path, name: str, n: int, h: int, w: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    tifffile.imwrite(tmp_path / f"{name}.tif", rng.integers(0, 256, (n, h, w), dtype=np.uint8),
                     photometric="minisblack")
    tifffile.imwrite(tmp_path / f"{name}-labels.tif", (rng.random((n, h, w)) > 0.3).astype(np.uint8) * 255,
                     photometric="minisblack")
    return {"image": str(tmp_path / f"{name}.tif"), "labels": str(tmp_path / f"{name}-labels.tif"), "kind": "membrane"}


@pytest.fixture
def two_volumes(tmp_path) -> Path:
    """Extracted frames of two volumes: 7 frames of 48x64 and 5 frames of 40x32, no test volume."""
    pairs = [_volume(tmp_path, "a", 7, 48, 64, 0), _volume(tmp_path, "b", 5, 40, 32, 1)]
    extract_pairs(pairs, None, tmp_path / "frames")
    return tmp_path / "frames"


def test_every_third_applies_per_volume_and_split_csv_names_each_frames_source(two_volumes, tmp_path):
    table = split_dataset(two_volumes, tmp_path / "split")
    val = table[table["subset"] == "val"]
    assert list(val["frame_id"]) == ["v0-00000", "v0-00003", "v0-00006", "v1-00000", "v1-00003"]
    assert list(val["volume"]) == ["0", "0", "0", "1", "1"] and list(val["index"]) == ["0", "3", "6", "0", "3"]
    assert (table["subset"] == "train").sum() == 7 and (table["subset"] == "test").sum() == 0
    written = (tmp_path / "split" / "split.csv").read_text().splitlines()
    assert written[0] == "frame_id,subset,image,mask,volume,index"
    assert "v1-00001,train,train/image/v1-00001.png,train/mask/v1-00001.png,1,1" in written


def test_datasets_of_two_frame_sizes(two_volumes, tmp_path):
    split_dataset(two_volumes, tmp_path / "split")
    spec = describe_split(tmp_path / "split", image_size=32, input_mode="crop", in_channels=1, augmentation="none")
    assert spec["frame_shape"] is None and spec["frame_shapes"] == [[40, 32], [48, 64]]
    assert len(spec["train"]) == 7 and len(spec["val"]) == 5
    with pytest.raises(ValueError, match="frames are 40x32, smaller than the recipe's crop of 48"):
        describe_split(tmp_path / "split", image_size=48, input_mode="crop", in_channels=1, augmentation="none")


def test_neighbouring_sections_stay_within_their_volume(two_volumes, tmp_path):
    split_dataset(two_volumes, tmp_path / "split")
    first_of_b = tmp_path / "split" / "val" / "image" / "v1-00000.png"
    assert volume_of(first_of_b.name) == "v1" and volume_of("00003.png") == ""
    names = [p.name for p in section_paths(first_of_b, 3)]
    assert names == ["v1-00000.png", "v1-00000.png", "v1-00001.png"]  # not v0-00006, the frame before it by name
    last_of_a = tmp_path / "split" / "val" / "image" / "v0-00006.png"
    assert [p.name for p in section_paths(last_of_a, 3)] == ["v0-00005.png", "v0-00006.png", "v0-00006.png"]


def test_a_single_volume_splits_as_ever():
    ids = [f"{i:05d}" for i in range(30)]
    for mode, seed in (("every_third", 0), ("random", 3)):
        assert assign_by_volume(dict.fromkeys(ids, "0"), mode, seed) == assign_subsets(ids, mode, seed)


def test_split_errors_for_several_volumes():
    with pytest.raises(ValueError, match="at least 3 labelled frames"):
        assign_by_volume({"v0-00000": "0", "v1-00000": "1"})
    with pytest.raises(ValueError, match="leaves no frame to train on.*use the random split"):
        assign_by_volume({f"v{k}-00000": str(k) for k in range(4)})
    assert set(assign_by_volume({f"v{k}-00000": str(k) for k in range(6)}, "random").values()) == {"train", "val"}


def test_scores_of_frames_of_different_sizes_aggregate_frame_by_frame():
    rng = np.random.default_rng(0)
    masks = [(rng.random(shape) > 0.3).astype(np.uint8) for shape in ((32, 48), (32, 48), (24, 20))]
    probs = [np.clip(m * 0.8 + rng.random(m.shape) * 0.4, 0, 1).astype(np.float32) for m in masks]
    got = native_scores(probs, masks)
    # confusion scores: pixel-weighted, every pixel of every frame counted once
    flat_pred = np.concatenate([(p >= 0.5).ravel() for p in probs]).astype(np.uint8)
    flat_mask = np.concatenate([m.ravel() for m in masks])
    expected = confusion_scores(confusion_counts(flat_pred, flat_mask))
    for key in ("cell_iou", "membrane_dice", "membrane_iou", "balanced_accuracy"):
        assert got[key] == pytest.approx(expected[key], abs=1e-12), key
    # V_rand: the mean over the three frames at each threshold, then the best threshold
    per_frame = [segmentation_scores(p, m)["per_threshold"] for p, m in zip(probs, masks)]
    means = {t: np.mean([f[t]["v_rand"] for f in per_frame]) for t in per_frame[0]}
    best = max(means, key=means.get)
    assert got["v_rand"] == pytest.approx(means[best], abs=1e-12) and got["v_rand_threshold"] == best
    # frames of one size: the stacked computation, to the last bit
    same = native_scores(np.stack(probs[:2]), np.stack(masks[:2]))
    assert native_scores(probs[:2], masks[:2]) == same
    with pytest.raises(ValueError, match="one shape, frame for frame"):
        native_scores(probs, masks[::-1])


def test_central_crops():
    a, b = np.arange(48).reshape(6, 8), np.arange(12).reshape(4, 3)
    crops = central_crops([a, b])
    assert crops.shape == (2, 4, 3)
    np.testing.assert_array_equal(crops[0], a[1:5, 2:5])
    np.testing.assert_array_equal(central_crops([a, a]), np.stack([a, a]))


def test_a_zarr_volume_with_a_folder_of_label_frames_and_a_folder_as_test_volume(tmp_path):
    import cv2
    import zarr

    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (4, 64, 72), dtype=np.uint8)
    zarr.open_array(str(tmp_path / "em.zarr"), mode="w", shape=images.shape, dtype="uint8")[:] = images
    (tmp_path / "labels").mkdir()
    (tmp_path / "test").mkdir()
    labels = (rng.random((4, 64, 72)) > 0.5).astype(np.uint8)  # kind cells: 1 = membrane
    for i, (frame, test) in enumerate(zip(labels, images[::-1])):
        cv2.imwrite(str(tmp_path / "labels" / f"{i:02d}.png"), frame)
        cv2.imwrite(str(tmp_path / "test" / f"t{i}.png"), test)
    pair = {"image": str(tmp_path / "em.zarr"), "labels": str(tmp_path / "labels"), "kind": "cells"}
    info = extract_pairs([pair], str(tmp_path / "test"), tmp_path / "out")
    assert info["train_frames"] == 4 and info["test_frames"] == 4 and info["test_frame_shape"] == [64, 72]
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "out" / "images" / "00002.png"), 0), images[2])
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "out" / "masks" / "00002.png"), 0), (1 - labels[2]) * 255)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "out" / "test" / "00000.png"), 0), images[3])
