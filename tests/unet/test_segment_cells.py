"""Tests of unet.segment: cell instances from the probability map, and their V_rand / V_info."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy.ndimage import binary_erosion

from unet.metrics import segmentation_scores
from unet.segment import filled_segmentation_scores, segment_cells


def test_segment_cells_fill_membrane_assigns_every_pixel_and_keeps_the_cut():
    prob = np.zeros((7, 9))
    prob[1:6, 1:3] = 0.9  # left cell core
    prob[1:6, 6:8] = 0.9  # right cell core, a 3-pixel membrane band between them
    plain = segment_cells(prob, 0.5)
    assert plain.max() == 2 and (plain == 0).sum() == 7 * 9 - 20
    filled = segment_cells(prob, 0.5, fill_membrane=True)
    assert (filled > 0).all()  # nothing left on the membrane
    assert set(np.unique(filled[:, :4]).tolist()) == {1} and set(np.unique(filled[:, 5:]).tolist()) == {2}
    assert (filled[plain > 0] == plain[plain > 0]).all()  # the components themselves do not change
    assert not segment_cells(np.zeros((4, 4)), 0.5, fill_membrane=True).any()


def test_fill_membrane_removes_the_thick_membrane_penalty():
    target = np.ones((9, 13), np.uint8)
    target[:, 6] = 0  # two cells, a one-pixel membrane
    prob = np.full((9, 13), 0.9)
    prob[:, 5:8] = 0.1  # a correct cut, but three pixels wide: two gt-cell columns predicted membrane
    strict = segmentation_scores(prob, target, thresholds=(0.5,))
    filled = filled_segmentation_scores(prob, target, thresholds=(0.5,))
    assert strict["v_rand"] < 0.9  # the predicted membrane pixels count as one more segment across both cells
    assert filled["v_rand"] == filled["v_info"] == 1.0


def test_fill_membrane_on_real_labels_keeps_a_perfect_score(isbi_dir):
    target = (tifffile.imread(isbi_dir / "train-labels.tif")[:2] > 127).astype(np.uint8)
    got = filled_segmentation_scores(target.astype(np.float32), target, thresholds=(0.5,))
    assert got["v_rand"] == pytest.approx(1.0) and got["v_info"] == pytest.approx(1.0)
    eroded = np.stack([binary_erosion(t, iterations=2) for t in target]).astype(np.float32)  # cells 2 px smaller
    strict = segmentation_scores(eroded, target, thresholds=(0.5,))["v_rand"]
    filled = filled_segmentation_scores(eroded, target, thresholds=(0.5,))["v_rand"]
    assert filled > strict


def test_filled_scores_reject_what_the_strict_scores_reject():
    with pytest.raises(ValueError, match="binary"):
        filled_segmentation_scores(np.zeros((4, 4)), np.full((4, 4), 2))
    with pytest.raises(ValueError, match="thresholds"):
        filled_segmentation_scores(np.zeros((4, 4)), np.ones((4, 4)), thresholds=(1.5,))
    with pytest.raises(ValueError, match="one frame"):
        segment_cells(np.zeros((2, 4, 4)), 0.5)


def test_a_pixel_at_the_threshold_is_cell_as_in_the_strict_scores():
    # segment_cells' components are those of cell_prob >= threshold, the rule of
    # segmentation_scores' own segmentation: the filled and strict scores must cut at the same pixels
    prob = np.array([[0.5, 0.2, 0.5]])
    assert segment_cells(prob, 0.5).tolist() == [[1, 0, 2]]
    target = np.array([[1, 0, 1]], np.uint8)
    assert segmentation_scores(prob, target, thresholds=(0.5,))["v_rand"] == 1.0


def test_fill_membrane_grows_a_single_cell_over_the_whole_frame():
    # one component is a frame with one cell: every membrane pixel joins it (the docstring's promise,
    # "grown until every pixel belongs to a component"), not only when there are two or more
    prob = np.zeros((5, 6))
    prob[1:3, 1:3] = 0.9
    filled = segment_cells(prob, 0.5, fill_membrane=True)
    assert (filled == 1).all()


def test_filling_equals_scikit_images_expand_labels_on_real_frames(isbi_dir):
    # segment_cells fills with the EDT's nearest-pixel indices directly; expand_labels with a
    # distance no pixel exceeds is the reference, on real frames thresholded as the scores do
    import tifffile
    from skimage.segmentation import expand_labels

    frames = tifffile.imread(isbi_dir / "train-volume.tif")[:3].astype(np.float32) / 255
    for frame in frames:
        for t in (0.3, 0.5, 0.7):
            plain = segment_cells(frame, t)
            filled = segment_cells(frame, t, fill_membrane=True)
            assert plain.max() > 10 and filled.min() > 0
            np.testing.assert_array_equal(filled, expand_labels(plain, distance=float(sum(frame.shape))))


def test_one_pass_gives_the_two_sweeps_numbers_exactly(isbi_dir):
    # the evaluate stage scores both segmentations in one pass (components labelled once per frame
    # and threshold): the same dicts as the two separate sweeps, on real labels made soft
    import cv2

    from unet.segment import plain_and_filled_scores

    target = (tifffile.imread(isbi_dir / "train-labels.tif")[:4] > 127).astype(np.uint8)
    rng = np.random.default_rng(0)
    prob = np.stack([np.clip(cv2.GaussianBlur(t.astype(np.float32), (0, 0), 2.0)
                             + rng.normal(0, 0.1, t.shape).astype(np.float32), 0, 1) for t in target])
    plain, filled = plain_and_filled_scores(prob, target)
    assert plain == segmentation_scores(prob, target)
    assert filled == filled_segmentation_scores(prob, target)
    assert filled["v_rand"] != plain["v_rand"]  # two different segmentations were scored
