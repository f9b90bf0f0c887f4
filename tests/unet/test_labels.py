"""unet.labels and the extract stage's labels kinds: masks converted pixel for pixel, bad label
volumes rejected with one line naming the file."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from skimage.measure import label

from unet.frames import extract_pairs, read_label_values
from unet.labels import KINDS, cell_masks, check_membrane_width, instance_mask


def _tiles(h: int = 16, w: int = 20) -> np.ndarray:
    """Instance ids of one frame, known by construction: four cells tiling the frame with no gap
    (1 top-left, 2 top-right, 3 bottom-left, 4 bottom-right), a 0 border 2 px wide around them."""
    ids = np.zeros((h, w), np.uint32)
    ids[2:6, 2:8], ids[2:6, 8:14] = 1, 2
    ids[6:10, 2:8], ids[6:10, 8:14] = 3, 4
    return ids


def _expected(width: int) -> np.ndarray:
    """The cell mask of :func:`_tiles` by hand: the four cells minus width/2 px on each side of the
    contact lines between them (row 5|6, column 7|8); the 0 border changes nothing."""
    half = width // 2
    cell = _tiles() != 0
    cell[6 - half:6 + half, :] &= False
    cell[:, 8 - half:8 + half] &= False
    return cell


@pytest.mark.parametrize("width", [2, 4])
def test_instance_boundaries_are_known_pixel_for_pixel(width):
    got = instance_mask(_tiles(), width)
    np.testing.assert_array_equal(got, _expected(width))
    # 2 px: exactly the contact pixels; every cell keeps its pixels next to the 0 border
    assert got.sum() == (_tiles() != 0).sum() - (12 * 1 + 8 * 1) * width + width * width


def test_a_volume_of_instances_becomes_masks_frame_by_frame(tmp_path):
    ids = np.stack([_tiles(), np.where(_tiles() > 0, 7, 0).astype(np.uint32), _tiles() * 1000])
    masks = cell_masks(ids.astype(np.uint16), "instances", "ids.tif")
    assert masks.dtype == np.uint8 and set(np.unique(masks).tolist()) == {0, 255}
    np.testing.assert_array_equal(masks[0] == 255, _expected(2))
    np.testing.assert_array_equal(masks[1] == 255, _tiles() > 0)  # one id: no contact, no membrane
    np.testing.assert_array_equal(masks[2] == 255, _expected(2))  # ids need not be consecutive


def test_connected_components_of_a_real_mask_give_the_mask_back(isbi_dir):
    # instance labels made from ISBI's binary labels (8-connected components): no two ids touch,
    # so the conversion draws no membrane and the mask comes back pixel for pixel
    mask = tifffile.imread(isbi_dir / "train-labels.tif", key=0)
    ids = label(mask > 0).astype(np.uint32)
    assert ids.max() > 50
    np.testing.assert_array_equal(instance_mask(ids), mask > 0)


def test_the_three_kinds_of_one_frame():
    binary = (_tiles() > 0).astype(np.uint8)[None]
    np.testing.assert_array_equal(cell_masks(binary * 255, "membrane", "l.tif"), binary * 255)
    np.testing.assert_array_equal(cell_masks(binary, "cells", "l.tif"), (1 - binary) * 255)
    np.testing.assert_array_equal(cell_masks(binary.astype(bool), "cells", "l.tif"), (1 - binary) * 255)
    assert KINDS == ("membrane", "cells", "instances")


def test_extract_writes_the_converted_masks_and_where_each_frame_comes_from(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 16, 20), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "ids.tif", np.stack([_tiles()] * 3), photometric="minisblack")
    tifffile.imwrite(tmp_path / "img.tif", images, photometric="minisblack")
    membrane = np.stack([(_tiles() == 0).astype(np.uint8)] * 3)  # cells kind: nonzero = membrane
    tifffile.imwrite(tmp_path / "inverse.tif", membrane, photometric="minisblack")
    pairs = [{"image": str(tmp_path / "img.tif"), "labels": str(tmp_path / "ids.tif"), "kind": "instances"},
             {"image": str(tmp_path / "img.tif"), "labels": str(tmp_path / "inverse.tif"), "kind": "cells"}]
    info = extract_pairs(pairs, None, tmp_path / "out", membrane_width=4)
    assert info["train_frames"] == 6 and info["test_frames"] == 0 and info["membrane_width"] == 4
    assert [v["kind"] for v in info["volumes"]] == ["instances", "cells"]
    masks = sorted((tmp_path / "out" / "masks").glob("*.png"))
    assert [p.name for p in masks] == [f"v{k}-{i:05d}.png" for k in (0, 1) for i in range(3)]
    np.testing.assert_array_equal(cv2.imread(str(masks[0]), cv2.IMREAD_UNCHANGED) == 255, _expected(4))
    np.testing.assert_array_equal(cv2.imread(str(masks[3]), cv2.IMREAD_UNCHANGED) == 255, _tiles() > 0)
    listing = (tmp_path / "out" / "frames.csv").read_text().splitlines()
    assert listing[0] == "frame,volume,index,image,labels,kind"
    assert listing[4].startswith("v1-00000,1,0,") and listing[4].endswith(",cells")
    assert not list((tmp_path / "out" / "test").iterdir())


def test_labels_from_a_folder_of_frames(tmp_path):
    folder = tmp_path / "labels"
    folder.mkdir()
    ids = np.stack([_tiles(64, 64) * 300] * 2).astype(np.uint16)  # 16-bit ids above 255
    for i, frame in enumerate(ids):
        cv2.imwrite(str(folder / f"{i:03d}.png"), frame)
    np.testing.assert_array_equal(read_label_values(folder), ids)


# --- bad label volumes --------------------------------------------------------------------------

def _pair(tmp_path, labels: np.ndarray, kind: str = "instances", images: np.ndarray | None = None) -> dict:
    images = np.zeros((3, 32, 32), np.uint8) if images is None else images
    tifffile.imwrite(tmp_path / "img.tif", images, photometric="minisblack")
    tifffile.imwrite(tmp_path / "lab.tif", labels, photometric="minisblack")
    return {"image": str(tmp_path / "img.tif"), "labels": str(tmp_path / "lab.tif"), "kind": kind}


@pytest.mark.parametrize("labels, message", [
    (np.zeros((2, 32, 32), np.uint16), r"img\.tif has shape \(3, 32, 32\) but .*lab\.tif has shape \(2, 32, 32\); "
                                       "expected the same frame count and size"),
    (np.zeros((3, 32, 40), np.uint16), r"but .*lab\.tif has shape \(3, 32, 40\)"),
    (np.full((3, 32, 32), 2.0, np.float32), r"lab\.tif: float32 labels, expected integer instance ids .*; they are "
                                            "whole numbers: save them as uint32"),
    (np.full((3, 32, 32), 0.5, np.float64), r"lab\.tif: float64 labels, expected integer instance ids \(uint8 to "
                                            r"uint64\)$"),
    (np.full((3, 32, 32), 2**32, np.uint64), r"lab\.tif: instance id 4294967296 is above 2\^32 - 1 = 4294967295"),
    (np.full((3, 32, 32), -1, np.int32), r"lab\.tif: negative instance id -1"),
])
def test_bad_instance_volumes_are_one_line_errors_naming_the_file(tmp_path, labels, message):
    with pytest.raises(ValueError, match=message) as err:
        extract_pairs([_pair(tmp_path, labels)], None, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_ids_up_to_two_to_the_32_minus_one_are_fine(tmp_path):
    ids = np.zeros((3, 32, 32), np.uint64)
    ids[:, :, :16], ids[:, :, 16:] = 2**32 - 1, 5
    masks = cell_masks(ids, "instances", "big.tif")
    assert (masks[:, :, 15:17] == 0).all() and (masks[:, :, :15] == 255).all() and (masks[:, :, 17:] == 255).all()


def test_instance_ids_declared_as_membrane_get_a_hint(tmp_path):
    ids = np.repeat(_tiles(32, 32)[None], 3, axis=0).astype(np.uint16)
    with pytest.raises(ValueError, match=r"lab\.tif: labels must be binary \(0/255 or 0/1\), found values "
                                         r"\[0, 1, 2, 3, 4\]; if these are instance ids .*declare the labels kind instances"):
        extract_pairs([_pair(tmp_path, ids, kind="membrane")], None, tmp_path / "out")


def test_unknown_kind_and_bad_widths():
    with pytest.raises(ValueError, match=r"lab\.tif: unknown labels kind 'boundaries', expected one of membrane, "
                                         "cells, instances"):
        cell_masks(np.zeros((1, 8, 8), np.uint8), "boundaries", "lab.tif")
    for width in (0, 1, 3, -2, 2.0):
        with pytest.raises(ValueError, match="even number of pixels >= 2"):
            check_membrane_width(width)
    assert check_membrane_width(6) == 6
