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


def _moved(masks: np.ndarray, dy: float, dx: float, sigma: float = 1.0, k: int = 4) -> np.ndarray:
    """The masks blurred by ``sigma`` px and moved by (``dy``, ``dx``) px, multiples of 1/``k``, without
    interpolation: drawn at ``k`` times the resolution, moved by whole pixels there, blurred and
    averaged back. Like a network's prediction of a scene that sits off its labels, the result is exactly as
    sharp whatever the shift (a bilinear ``shift`` of ``_soft(masks)`` would blur it by an amount that
    depends on the shift's fraction, which the estimate then mistakes for misalignment)."""
    h, w = masks.shape[1:]
    out = []
    for m in masks:
        big = np.kron(m.astype(np.float32), np.ones((k, k), np.float32))
        big = cv2.warpAffine(big, np.float32([[1, 0, dx * k], [0, 1, dy * k]]), (w * k, h * k),
                             flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101)
        big = cv2.GaussianBlur(big, (0, 0), sigma * k)
        out.append(big.reshape(h, k, w, k).mean(axis=(1, 3)))
    return np.stack(out)


def test_moving_without_interpolation_moves_content_as_shift_does(labels):
    # content at (y, x) goes to (y + dy, x + dx), as with unet.align.shift: here one down, two left
    still, moved = _moved(labels, 0.0, 0.0), _moved(labels, 1.0, -2.0)
    np.testing.assert_allclose(moved[:, 10:-10, 10:-10], still[:, 9:-11, 12:-8], atol=1e-6)
    assert np.abs(moved - still).max() > 0.5


# Whole and half pixels, up to the search's 1.5 px, each axis and both signs; a network's blur
# (sigma 1, as _soft) and a sharper one.
@pytest.mark.parametrize("sigma", [1.0, 0.5])
@pytest.mark.parametrize("dy, dx", [(1.0, -0.5), (-0.5, 0.5), (0.5, -1.0), (-1.5, 0.0), (0.0, 1.5)])
def test_a_known_shift_of_real_labels_is_recovered_within_a_tenth_of_a_pixel(labels, dy, dx, sigma):
    # predictions (dy, dx) off their labels need (-dy, -dx); the 0.1 px bar is the issue's: on its
    # 0.25 px grid the estimate must be the exact grid point
    a = estimate_shift(_moved(labels, dy, dx, sigma), labels)
    assert abs(a.dy + dy) <= 0.1 and abs(a.dx + dx) <= 0.1, (dy, dx, a)
    assert a.mse_after < a.mse_before


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "unet/align.py estimate_shift scores each candidate shift after a bilinear warp, whose blur is 0 at "
    "whole pixels and largest at half pixels, so a quarter-pixel offset of sharp predictions comes back "
    "as the nearest whole pixel: ISBI's own offset (0.5, 0.25) is estimated as (-0.5, 0.0). Measured "
    "on these 3 frames over the 121 offsets of the 0.25 px grid up to 1.25 px: with sigma 0.5, all 96 "
    "with a quarter-pixel component are 0.25 px off; with sigma 1, 27 of them"))
@pytest.mark.parametrize("dy, dx", [(0.5, 0.25), (-0.25, 0.0), (0.75, -1.25)])
def test_a_quarter_pixel_shift_is_recovered_within_a_tenth_of_a_pixel(labels, dy, dx):
    a = estimate_shift(_moved(labels, dy, dx, sigma=0.5), labels)
    assert abs(a.dy + dy) <= 0.1 and abs(a.dx + dx) <= 0.1, (dy, dx, a)


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
