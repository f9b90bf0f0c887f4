"""The alignment shift: applying a shift, recovering a known one, and the offset of the real ISBI
labels against their own images."""
import cv2
import numpy as np
import pytest
import tifffile

from unet.align import Alignment, estimate_shift, image_as_probability, shift


def test_whole_pixel_shift_moves_content_exactly():
    a = np.zeros((9, 9), np.float32)
    a[4, 4] = 1.0
    b = shift(a, 1.0, -2.0)
    assert b[5, 2] == pytest.approx(1.0) and b.sum() == pytest.approx(1.0)


def test_half_pixel_shift_splits_between_neighbours_and_zero_is_identity():
    a = np.zeros((2, 9, 9), np.float32)
    a[:, 4, 4] = 1.0
    b = shift(a, 0.5, 0.0)
    np.testing.assert_allclose(b[:, 4:6, 4], 0.5, atol=1e-3)
    assert shift(a, 0.0, 0.0) is not None and np.array_equal(shift(a, 0.0, 0.0), a)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"\[H, W\] or \[N, H, W\]"):
        shift(np.zeros(5), 1.0, 0.0)
    with pytest.raises(ValueError, match="one shape"):
        estimate_shift(np.zeros((1, 32, 32)), np.zeros((1, 32, 31)))
    with pytest.raises(ValueError, match="too small"):
        estimate_shift(np.zeros((1, 6, 6)), np.zeros((1, 6, 6)))


@pytest.fixture(scope="module")
def labels(isbi_dir):
    return (tifffile.imread(isbi_dir / "train-labels.tif")[:3] > 127).astype(np.uint8)


def _soft(masks: np.ndarray) -> np.ndarray:
    """A network-like probability map of binary masks: blurred edges."""
    return np.stack([cv2.GaussianBlur(m.astype(np.float32), (0, 0), 1.0) for m in masks])


def test_a_known_shift_of_real_labels_is_recovered(labels):
    # a prediction a pixel below and half a pixel left of its labels. (A shift made by interpolation
    # also blurs; the estimate picks the shift whose result matches best, blur included, which for
    # a made-up shift of 0.75 is 1.0: the test uses shifts that interpolation undoes exactly enough.)
    moved = shift(_soft(labels), 1.0, -0.5)
    a = estimate_shift(moved, labels)
    assert (a.dy, a.dx) == (-1.0, 0.5)
    assert a.mse_after < a.mse_before


def test_centred_predictions_are_left_alone(labels):
    a = estimate_shift(_soft(labels), labels)
    assert a.is_zero and a.mse_after == a.mse_before


def test_isbi_labels_sit_above_the_membranes_of_their_images(isbi_dir, labels):
    """The finding unet/align.py corrects: even the image itself, read as a crude cell probability
    (bright = cell), matches its labels best moved about half a pixel up and a quarter left —
    the same shift the trained networks' predictions need (docs/results.md)."""
    images = tifffile.imread(isbi_dir / "train-volume.tif")[:3]
    a = estimate_shift(image_as_probability(images), labels)
    assert a.dy in (-0.75, -0.5) and a.dx in (-0.5, -0.25), a


def test_alignment_round_trips_through_a_dict():
    a = Alignment(dy=-0.5, dx=0.25, mse_before=0.1, mse_after=0.09)
    assert Alignment.from_dict(a.to_dict()) == a
    assert Alignment.from_dict(None).is_zero
