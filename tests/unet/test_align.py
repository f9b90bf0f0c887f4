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
    with pytest.raises(ValueError, match=r"frames of \(5, 64\) are too small to estimate a shift of up to 1.5 px"):
        estimate_shift(np.zeros((1, 5, 64)), np.zeros((1, 5, 64)))  # too short, however wide


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


def test_a_shift_along_one_axis_only_is_not_zero():
    # Alignment.is_zero decides whether the evaluate stage applies the shift at all
    assert not Alignment(dy=0.0, dx=-0.25).is_zero and not Alignment(dy=0.5, dx=0.0).is_zero
    assert Alignment().is_zero
    a = np.zeros((5, 5), np.float32)
    a[2, 2] = 1.0
    assert shift(a, 0.0, 1.0)[2, 3] == pytest.approx(1.0)  # (0, dx) moves too
    assert shift(a, -1.0, 0.0)[1, 2] == pytest.approx(1.0)


def test_from_dict_reads_the_evaluate_stages_record():
    # metrics.json's alignment carries an extra "applied"; an absent record is no shift
    a = Alignment.from_dict({"dy": -0.5, "dx": -0.25, "mse_before": 0.2, "mse_after": 0.1, "applied": True})
    assert a == Alignment(-0.5, -0.25, 0.2, 0.1)
    assert Alignment.from_dict({"dy": 1.0}) == Alignment(dy=1.0)
    assert Alignment.from_dict({}) == Alignment()


def test_borders_are_mirrored_not_filled_with_zeros():
    # a zero (membrane) border would add a false membrane along every shifted frame's edge
    ramp = np.tile(np.arange(6, dtype=np.float32), (4, 1))  # value = column
    moved = shift(ramp, 0.0, 2.0)  # content moves right: columns 0, 1 come from columns -2, -1
    np.testing.assert_allclose(moved[:, 2:], ramp[:, :4])
    np.testing.assert_allclose(moved[:, :2], ramp[:, [2, 1]])  # reflect-101: -1 -> 1, -2 -> 2
    assert moved.dtype == np.float32


def test_image_as_probability_spans_the_10th_to_60th_percentile_of_each_frame(isbi_dir):
    # the docstring's recipe: blurred grey values, 0 at and below the frame's 10th percentile, 1 at
    # and above its 60th, bright (cell) high; each frame on its own scale
    images = tifffile.imread(isbi_dir / "train-volume.tif")[:2].astype(np.float32)
    images[1] = images[1] * 0.5 + 40  # another contrast: the same map
    prob = image_as_probability(images)
    assert prob.shape == images.shape and prob.min() == 0.0 and prob.max() == 1.0
    for p in prob:
        assert np.mean(p == 0.0) == pytest.approx(0.10, abs=0.005)
        assert np.mean(p == 1.0) == pytest.approx(0.40, abs=0.005)
    blurred = cv2.GaussianBlur(images[0], (0, 0), 1.0)
    lo, hi = np.percentile(blurred, [10, 60])
    np.testing.assert_allclose(prob[0], np.clip((blurred - lo) / (hi - lo), 0, 1), atol=1e-5)
    # the stacks are uint8: blurred in float, not rounded back to whole grey levels
    as_read = tifffile.imread(isbi_dir / "train-volume.tif")[:1]
    np.testing.assert_allclose(image_as_probability(as_read), prob[:1], atol=1e-5)


def test_without_a_better_shift_the_estimate_is_zero():
    # ties go to the smaller shift: a prediction that no shift improves is left where it is
    rng = np.random.default_rng(0)
    target = (rng.random((2, 24, 24)) < 0.7).astype(np.uint8)
    flat = np.full(target.shape, 0.7, np.float32)
    a = estimate_shift(flat, target)
    assert a.is_zero and a.mse_after == a.mse_before == pytest.approx(np.mean((0.7 - target[:, 3:-3, 3:-3]) ** 2))


def test_the_search_stays_within_max_shift_and_on_the_step_grid(labels):
    labels = labels[:1, :192, :192]  # one corner of a frame is enough here
    moved = _moved(labels, 1.5, 0.0)
    a = estimate_shift(moved, labels, max_shift=0.5)  # the true -1.5 is out of reach: the nearest edge
    assert (a.dy, a.dx) == (-0.5, 0.0)
    a = estimate_shift(moved, labels, max_shift=1.5, step=0.5)
    assert (a.dy, a.dx) == (-1.5, 0.0)
    # an even number of steps on one axis and an odd one on the other: found by the fine search's
    # neighbours in the coarse optimum's own row
    a = estimate_shift(_moved(labels, 1.0, 0.5), labels, max_shift=1.5, step=0.5)
    assert (a.dy, a.dx) == (-1.0, -0.5)
    assert estimate_shift(moved, labels, max_shift=0.0).is_zero  # no search at all
    with pytest.raises(ValueError, match="step > 0"):
        estimate_shift(moved, labels, step=0.0)
    with pytest.raises(ValueError, match="max_shift >= 0"):
        estimate_shift(moved, labels, max_shift=-0.25)


# --- found by mutation testing (benchmarks/mutation.py) -------------------------------------------

def _scored_shifts(monkeypatch, prob, target, **kwargs):
    """estimate_shift's answer and the shifts it scored, in steps, in the order of the search's
    batches (the shifts of one batch are scored in threads, in any order)."""
    import unet.align as align

    scored, real = [], align._shifted_mse
    step = kwargs.get("step", 0.25)

    def spy(p, t, dy, dx, margin):
        scored.append((round(dy / step), round(dx / step)))
        return real(p, t, dy, dx, margin)

    monkeypatch.setattr(align, "_shifted_mse", spy)
    return estimate_shift(prob, target, **kwargs), scored


@pytest.mark.parametrize("max_shift, step, spacings", [
    (1.5, 0.25, (4, 2, 1)),  # 6 steps each way: a 1 px grid (-4, 0, 4), then neighbours 2 and 1 steps away
    (1.5, 0.5, (2, 1)),  # 3 steps: (-2, 0, 2), then the neighbours 1 step away
])
def test_the_search_scores_a_coarse_grid_then_the_neighbours_of_the_best_half_as_far_each_time(
        monkeypatch, labels, max_shift, step, spacings):
    # the docstring's coarse-to-fine search, which sets its cost: a grid of the largest power-of-two
    # spacing within the window (with no shift on it), then the eight neighbours of the best at half
    # that spacing, and so on down to one step (9 + 8 + 8 shifts scored for the defaults instead of
    # all 13 x 13); each shift scored once
    labels = labels[:1, :64, :64]
    a, scored = _scored_shifts(monkeypatch, _moved(labels, 1.0, 0.0), labels, max_shift=max_shift, step=step)
    best = (round(-1.0 / step), 0)  # on both grids: found by the coarse search already
    assert (a.dy, a.dx) == (-1.0, 0.0)
    limit = round(max_shift / step)
    grid = range(-(limit // spacings[0]) * spacings[0], limit + 1, spacings[0])
    batches = [{(y, x) for y in grid for x in grid}]
    batches += [{(best[0] + i * s, best[1] + j * s) for i in (-1, 0, 1) for j in (-1, 0, 1)} - {best}
                for s in spacings[1:]]
    assert len(scored) == len(set(scored)) == sum(map(len, batches)) == 9 + 8 * (len(spacings) - 1)
    for batch in batches:
        assert set(scored[:len(batch)]) == batch
        scored = scored[len(batch):]


def test_the_smallest_frame_with_an_inner_pixel_to_score_is_accepted():
    # up to 1.5 px, the error is scored 3 px (ceil(1.5) + 1) away from every border: 7 px leave one
    # row and column to score, 6 px none
    rng = np.random.default_rng(1)
    target = (rng.random((2, 7, 7)) < 0.5).astype(np.uint8)
    a = estimate_shift(target.astype(np.float32), target)
    assert a.is_zero and a.mse_before == 0.0
    with pytest.raises(ValueError, match=r"frames of \(6, 7\) are too small"):
        estimate_shift(np.zeros((1, 6, 7)), np.zeros((1, 6, 7)))


def test_a_one_pixel_shift_down_moves_and_any_input_comes_back_float32():
    # shift's docstring: float32 whatever the input; a uint8 mask moved half a pixel is half in
    # each of two rows, not rounded to whole grey levels
    a = np.zeros((5, 5), np.uint8)
    a[2, 2] = 1
    down = shift(a, 1.0, 0.0)
    assert down[3, 2] == pytest.approx(1.0) and down[2, 2] == pytest.approx(0.0)
    half = shift(a, 0.5, 0.0)
    assert half.dtype == np.float32 and half[2, 2] == pytest.approx(0.5) and half[3, 2] == pytest.approx(0.5)
    assert shift(a.astype(np.float64), 0.25, 0.0).dtype == np.float32
    assert shift(a.astype(np.float64), 0.0, 0.0).dtype == np.float32


def _at_offset(a: np.ndarray, offset: int) -> np.ndarray:
    """A copy of ``a`` starting ``offset`` float32 elements into a fresh buffer: another memory alignment."""
    buf = np.empty(a.size + 16, a.dtype)
    out = buf[offset:offset + a.size].reshape(a.shape)
    out[...] = a
    return out


def test_the_error_does_not_depend_on_where_the_arrays_sit_in_memory(isbi_dir, labels):
    # a kill-matrix rerun once reported mse values an ulp apart from the uninterrupted run's: OpenCV's
    # norm summed differently for differently aligned buffers (fresh arrays sit wherever the
    # allocator puts them); the same pixels must give the same error, shifted or not
    from unet.align import _shifted_mse

    images = tifffile.imread(isbi_dir / "train-volume.tif")[:3]
    prob, target = image_as_probability(images).astype(np.float32), labels.astype(np.float32)
    for dy, dx in ((0.0, 0.0), (0.25, -0.5)):
        errors = {_shifted_mse(_at_offset(prob, a), _at_offset(target, b), dy, dx, 3)
                  for a in range(16) for b in range(16)}
        assert len(errors) == 1, (dy, dx, errors)
