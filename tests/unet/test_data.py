import cv2
import numpy as np
import pytest
import tifffile

from unet.data import SegmentationSource, create_dataset, resize_transforms, train_transforms
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
