import cv2
import numpy as np
import pytest
import tifffile

import albumentations as A

from unet.data import (SegmentationSource, boundary_weight_map, create_dataset, label_offset, resize_transforms,
                       train_transforms)
from unet.recipes import PRESETS


@pytest.fixture(scope="module")
def real_pairs(isbi_dir, tmp_path_factory):
    """Four real ISBI frames and labels as PNG pairs."""
    d = tmp_path_factory.mktemp("pairs")
    vol = tifffile.imread(isbi_dir / "train-volume.tif")[:4]
    lab = tifffile.imread(isbi_dir / "train-labels.tif")[:4]
    pairs = []
    for i in range(4):
        cv2.imwrite(str(d / f"{i:05d}_img.png"), vol[i])
        cv2.imwrite(str(d / f"{i:05d}_mask.png"), lab[i])
        pairs.append((d / f"{i:05d}_img.png", d / f"{i:05d}_mask.png"))
    return pairs


@pytest.mark.parametrize("preset", ["seed", "fullres", "smoke"])
def test_samples_have_the_documented_types_and_shapes(real_pairs, preset):
    r = PRESETS[preset]
    src = SegmentationSource(real_pairs, train_transforms(r), r.in_channels, length=8)
    image, mask = src[5]
    assert image.shape == (r.in_channels, r.image_size, r.image_size) and image.dtype == np.float32
    assert mask.shape == (1, r.image_size, r.image_size) and mask.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert set(np.unique(mask)) <= {0.0, 1.0}


@pytest.mark.parametrize("preset", ["seed", "fullres"])
def test_augmentation_keeps_image_and_mask_aligned(tmp_path, preset):
    # the mask is the image thresholded: after any geometric augmentation it must still be
    rng = np.random.default_rng(1)
    img = np.kron(rng.integers(0, 2, (32, 32)), np.ones((16, 16))).astype(np.uint8) * 200 + 20
    cv2.imwrite(str(tmp_path / "i.png"), img)
    cv2.imwrite(str(tmp_path / "m.png"), np.where(img > 100, 255, 0).astype(np.uint8))
    r = PRESETS[preset].replace(augmentation="case" if preset == "seed" else "fullres")
    src = SegmentationSource([(tmp_path / "i.png", tmp_path / "m.png")], train_transforms(r), 1, length=30)
    for i in range(30):
        image, mask = src[i]
        bright = image[0] > (110 / 255)
        agree = (bright == (mask[0] > 0.5)).mean()
        assert agree > 0.97, (i, agree)  # edges of interpolated image vs nearest mask may differ


def test_resized_labels_keep_their_offset_from_the_membranes(isbi_dir):
    # The ISBI labels sit (-0.5, -0.25) px from the membranes of their images (unet/align.py), about
    # (-0.22, -0.11) px after a resize to 224. OpenCV's plain INTER_NEAREST would move the resized
    # mask about half a pixel down and right: measured (+0.25, +0.375).
    from unet.align import estimate_shift, image_as_probability

    images = tifffile.imread(isbi_dir / "train-volume.tif")[:3]
    labels = tifffile.imread(isbi_dir / "train-labels.tif")[:3]
    out = [resize_transforms(224)(image=i, mask=m) for i, m in zip(images, labels)]
    a = estimate_shift(image_as_probability(np.stack([o["image"] for o in out])),
                       np.stack([o["mask"] > 127 for o in out]), step=0.125)
    assert -0.375 <= a.dy <= 0 and -0.25 <= a.dx <= 0, a


def test_val_transform_is_resize_only(real_pairs):
    src = SegmentationSource(real_pairs, resize_transforms(64), 3)
    a, _ = src[0]
    b, _ = src[0]
    expected = cv2.resize(cv2.imread(str(real_pairs[0][0]), cv2.IMREAD_GRAYSCALE), (64, 64),
                          interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a[1], expected, atol=1 / 255)


def test_generator_dataset_batches(real_pairs):
    r = PRESETS["smoke"]
    src = SegmentationSource(real_pairs, train_transforms(r), 1, length=8)
    batches = list(create_dataset(src, 4, shuffle=True, num_workers=2).create_tuple_iterator(num_epochs=1))
    assert len(batches) == 2
    assert batches[0][0].shape == (4, 1, 64, 64) and batches[0][1].shape == (4, 1, 64, 64)


def test_boundary_weight_map_follows_the_unet_formula():
    # two 20x20 cells 4 px apart: on the gap d1 + d2 = 4 (+1 per pixel off-centre), far away it is 1
    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 5:25] = 1
    mask[10:30, 29:49] = 1
    w = boundary_weight_map(mask, w0=10.0, sigma=5.0)
    assert w.shape == mask.shape and w.dtype == np.float32
    # gap pixel at column 26: 2 px to the left cell's last column (24), 3 px to the right one's (29)
    assert w[20, 26] == pytest.approx(1 + 10 * np.exp(-(2 + 3) ** 2 / 50), rel=1e-4)
    # a cell pixel on the border: 0 to its own cell, 5 to the other
    assert w[20, 24] == pytest.approx(1 + 10 * np.exp(-5**2 / 50), rel=1e-4)
    # deep inside the left cell and far from both: almost 1
    assert w[20, 6] < 1.01 and w[0, 59] < 1.01
    # one cell alone: no second cell, weight 1 everywhere
    assert np.all(boundary_weight_map(mask[:, :27], 10.0, 5.0) == 1.0)


def test_boundary_weights_are_highest_on_the_membranes_of_real_frames(real_pairs):
    src = SegmentationSource(real_pairs, A.Compose([]), 1, boundary=(10.0, 5.0))
    for mask, w in zip(src.masks, src.weights):
        assert w.min() >= 1.0 and w.max() <= 11.0
        # the membranes between cells weigh more than the cells; cell pixels 20 px or more from any
        # membrane have no second cell within reach and weigh about 1
        assert w[mask == 0].mean() > 1.5 * w[mask == 1].mean()
        deep = cv2.distanceTransform(mask, cv2.DIST_L2, 5) >= 20
        assert deep.sum() > 1000 and w[deep].max() < 1.01


def test_weighted_sample_carries_the_weight_map_through_the_augmentation(real_pairs):
    r = PRESETS["fullres"].replace(boundary_weight=10.0)
    src = SegmentationSource(real_pairs, train_transforms(r), r.in_channels, length=8, seed=0,
                             boundary=(r.boundary_weight, r.boundary_sigma))
    src.set_epoch(1)
    image, mask = src[3]
    assert image.shape == (1, 256, 256) and mask.shape == (2, 256, 256) and mask.dtype == np.float32
    cells, weight = mask
    assert set(np.unique(cells)) <= {0.0, 1.0}
    # the weight map moved with the mask: its heavy pixels lie on the (augmented) membranes
    assert weight[cells == 0].mean() > 1.5 * weight[cells == 1].mean()
    # the same sample without weights is the same crop of the same mask
    plain = SegmentationSource(real_pairs, train_transforms(r), r.in_channels, length=8, seed=0)
    plain.set_epoch(1)
    np.testing.assert_array_equal(plain[3][1][0], cells)
    np.testing.assert_array_equal(plain[3][0], image)


def test_registered_labels_move_onto_their_images_membranes(real_pairs):
    plain = SegmentationSource(real_pairs, A.Compose([]), 1, boundary=(10.0, 5.0))
    registered = SegmentationSource(real_pairs, A.Compose([]), 1, boundary=(10.0, 5.0), register_labels=True)
    # ISBI's labels sit half a pixel above (and a quarter left of) their membranes: moved down-right
    assert plain.label_shift == (0.0, 0.0) and registered.label_shift == (0.5, 0.25)
    before, after = label_offset(plain.images, plain.masks), label_offset(registered.images, registered.masks)
    assert after.mse_before < before.mse_before  # the registered labels fit the images better, unshifted
    assert abs(after.dy) < abs(before.dy)
    for mask, soft, weight in zip(plain.masks, registered.masks, registered.weights):
        assert soft.dtype == np.float32 and soft.min() >= 0.0 and soft.max() <= 1.0
        assert 0.05 < np.mean((soft > 0) & (soft < 1)) < 0.5  # soft on the edges only
        assert abs(soft.sum() / mask.sum() - 1.0) < 0.01  # the same cells, moved: their area is kept
        # the weight map moved with its mask: heavy on the registered membranes
        assert weight[soft < 0.5].mean() > 1.5 * weight[soft >= 0.5].mean()


def test_registered_samples_are_soft_masks_in_unit_range(real_pairs):
    r = PRESETS["fullres"].replace(register_labels=True)
    src = SegmentationSource(real_pairs, train_transforms(r), r.in_channels, length=8, seed=0,
                             boundary=(r.boundary_weight, r.boundary_sigma), register_labels=True)
    src.set_epoch(1)
    for i in range(4):
        image, mask = src[i]
        assert image.shape == (1, 256, 256) and mask.shape == (2, 256, 256) and mask.dtype == np.float32
        assert 0.0 <= mask[0].min() and mask[0].max() <= 1.0 and mask[1].min() >= 0.99
