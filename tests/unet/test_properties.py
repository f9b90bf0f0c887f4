"""Properties of the scores (unet/metrics.py) and of the train/val split (unet/split.py) on arrays
and frame lists that hypothesis generates: small (at most 16x16 label images, 32x32 masks, 90
frame ids) and few (at most 60 examples a test), so that the file runs in seconds. Hypothesis keeps
its examples in .hypothesis/ (which ignores itself in git)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from unet.metrics import case_scores, confusion_counts, confusion_scores, v_info, v_rand
from unet.split import MODES, assign_subsets

FAST = settings(max_examples=60, deadline=None)
ISBI_SCORES = settings(max_examples=40, deadline=None)  # scikit-image's V_rand / V_info: ~10 ms each

shapes = st.tuples(st.integers(1, 32), st.integers(1, 32))
masks = shapes.flatmap(lambda s: st.tuples(arrays(np.uint8, s, elements=st.integers(0, 1)),
                                           arrays(np.uint8, s, elements=st.integers(0, 1))))
single_masks = shapes.flatmap(lambda s: arrays(np.uint8, s, elements=st.integers(0, 1)))
# label images: up to 6 segment ids (0 included) on up to 16x16 pixels, and a pair of the same shape
label_shapes = st.tuples(st.integers(1, 16), st.integers(1, 16))
label_pairs = label_shapes.flatmap(lambda s: st.tuples(arrays(np.int64, s, elements=st.integers(0, 5)),
                                                       arrays(np.int64, s, elements=st.integers(0, 5))))


# --------------------------------------------------------------------------- IoU and Dice


@FAST
@given(masks)
def test_confusion_scores_lie_in_0_1_and_dice_is_2_iou_over_1_plus_iou(pair):
    pred, target = pair
    s = confusion_scores(confusion_counts(pred, target))
    assert all(0.0 <= v <= 1.0 for v in s.values()), s
    for cls in ("cell", "membrane"):  # Dice = 2 IoU / (1 + IoU), the same class's (and 1 = 1 at 0/0)
        iou = s[f"{cls}_iou"]
        assert s[f"{cls}_dice"] == pytest.approx(2 * iou / (1 + iou), abs=1e-12)


@FAST
@given(masks)
def test_case_scores_lie_in_0_1_and_dice_is_2_iou_over_1_plus_iou(pair):
    # with the case's smoothing s: iou = I / (U + s), dice = 2I / (U + I + s), and 2 iou / (1 + iou)
    # simplifies to 2I / (U + s + I): the relation holds exactly, up to float rounding
    pred, target = pair
    s = case_scores(pred, target)
    assert all(0.0 <= v <= 1.0 for v in s.values()), s
    assert s["dice"] == pytest.approx(2 * s["iou"] / (1 + s["iou"]), abs=1e-12)


@FAST
@given(single_masks)
def test_a_perfect_prediction_scores_1(target):
    assert all(v == 1.0 for v in confusion_scores(confusion_counts(target, target)).values())
    s = case_scores(target, target)
    assert s["acc"] == 1.0
    # the case's smoothing (1e-5 in every denominator): 1 - 1e-5 at worst, and an empty class
    # scores ~0 even when it is predicted empty
    if target.any():
        assert min(s["iou"], s["dice"], s["sens"]) == pytest.approx(1.0, abs=1e-5)
    if not target.all():
        assert s["spec"] == pytest.approx(1.0, abs=1e-5)


@FAST
@given(single_masks)
def test_the_inverse_prediction_scores_0(target):
    # every pixel wrong: no true positive of either class, and a false one of a class on each pixel
    # (recalls and balanced accuracy are not 0 here: a class absent from the target has recall 0/0 = 1)
    s = confusion_scores(confusion_counts(1 - target, target))
    for key in ("acc", "cell_iou", "cell_dice", "membrane_iou", "membrane_dice"):
        assert s[key] == 0.0, (key, s)
    case = case_scores(1 - target, target)
    assert case["acc"] == case["iou"] == case["dice"] == 0.0


@FAST
@given(masks)
def test_confusion_counts_partition_the_pixels_and_add_up_over_frames(pair):
    pred, target = pair
    c = confusion_counts(pred, target)
    assert c.total == pred.size and c.tp + c.fn == int(target.sum()) and c.tp + c.fp == int(pred.sum())
    # a stack's matrix is the sum of its frames' (how the pipeline scores a dataset)
    assert confusion_counts(np.stack([pred, 1 - pred]), np.stack([target, target])) == \
        c + confusion_counts(1 - pred, target)


# --------------------------------------------------------------------------- V_rand and V_info


def _relabel(labels: np.ndarray, new_ids: list[int]) -> np.ndarray:
    """Id ``k`` becomes ``new_ids[k]`` (a permutation of 0..5)."""
    return np.asarray(new_ids, dtype=labels.dtype)[labels]


# scikit-image's adapted_rand_error divides 0 by 0 (and warns) for a side made of single-pixel
# segments only; v_rand's value there is still the formula's (test_v_rand_is_its_formula)
ZERO_BY_ZERO = pytest.mark.filterwarnings("ignore:invalid value encountered in scalar divide:RuntimeWarning")


@ZERO_BY_ZERO
@ISBI_SCORES
@given(label_pairs)
def test_v_rand_and_v_info_lie_in_0_1_and_a_perfect_segmentation_scores_1(pair):
    gt, pred = pair
    assert 0.0 <= v_rand(gt, pred) <= 1.0 + 1e-12
    assert 0.0 <= v_info(gt, pred) <= 1.0 + 1e-12
    assert v_rand(gt, gt) == pytest.approx(1.0, abs=1e-12)
    assert v_info(gt, gt) == pytest.approx(1.0, abs=1e-12)


def _v_rand_by_formula(gt: np.ndarray, pred: np.ndarray) -> float:
    """unet.metrics.v_rand's docstring, counted by hand: on gt-foreground pixels, with n_ij the
    pixels of gt segment i and predicted segment j, a_i and b_j the segment sizes and N the pixels,
    (sum n_ij^2 - N) / (0.5 (sum a_i^2 - N) + 0.5 (sum b_j^2 - N)); 1.0 without gt foreground or
    when the denominator is 0 (single-pixel segments only, on both sides)."""
    fg = gt != 0
    g, p = gt[fg], pred[fg]
    if g.size == 0:
        return 1.0
    n = g.size
    _, n_ij = np.unique(np.stack([g, p]), axis=1, return_counts=True)
    a, b = np.unique(g, return_counts=True)[1], np.unique(p, return_counts=True)[1]
    den = 0.5 * (np.sum(a ** 2) - n) + 0.5 * (np.sum(b ** 2) - n)
    return 1.0 if den == 0 else float((np.sum(n_ij ** 2) - n) / den)


@ZERO_BY_ZERO
@ISBI_SCORES
@given(label_pairs)
def test_v_rand_is_its_formula(pair):
    gt, pred = pair
    assert v_rand(gt, pred) == pytest.approx(_v_rand_by_formula(gt, pred), abs=1e-12)


@ZERO_BY_ZERO
@ISBI_SCORES
@given(label_pairs, st.permutations(range(6)), st.permutations(range(1, 6)))
def test_v_rand_and_v_info_do_not_depend_on_the_segment_ids(pair, pred_ids, gt_ids):
    """Renaming segments changes no segmentation: any permutation of the predicted ids (0 included:
    on gt foreground a predicted 0 is one more segment) and of the gt's non-zero ids (0 is the gt's
    ignored boundary and stays 0)."""
    gt, pred = pair
    gt2, pred2 = _relabel(gt, [0, *gt_ids]), _relabel(pred, list(pred_ids))
    assert v_rand(gt2, pred2) == pytest.approx(v_rand(gt, pred), abs=1e-9)
    assert v_info(gt2, pred2) == pytest.approx(v_info(gt, pred), abs=1e-9)


# --------------------------------------------------------------------------- the split


frame_ids = st.lists(st.integers(0, 10**5), min_size=3, max_size=90, unique=True)


def _expected_val_count(n: int, mode: str) -> int:
    """The val share as unet/split.py defines it: every third frame from the first, or a third rounded."""
    return math.ceil(n / 3) if mode == "every_third" else max(1, round(n / 3))


@FAST
@given(frame_ids, st.sampled_from(MODES), st.integers(0, 2**32 - 1))
def test_the_split_is_a_partition_with_a_third_in_val(ids, mode, seed):
    subsets = assign_subsets(ids, mode=mode, seed=seed)
    train = {i for i, s in subsets.items() if s == "train"}
    val = {i for i, s in subsets.items() if s == "val"}
    assert train | val == {str(i) for i in ids} and not train & val
    assert set(subsets.values()) <= {"train", "val"}
    assert len(val) == _expected_val_count(len(ids), mode)
    assert train, "no training frame"
    if mode == "every_third":  # the case: ids in sorted (string) order, every third from the first
        assert val == set(sorted(str(i) for i in ids)[::3])


@FAST
@given(frame_ids, st.sampled_from(MODES), st.integers(0, 2**32 - 1), st.randoms(use_true_random=False))
def test_the_split_does_not_depend_on_the_order_of_the_ids(ids, mode, seed, rng):
    shuffled = list(ids)
    rng.shuffle(shuffled)
    assert assign_subsets(shuffled, mode=mode, seed=seed) == assign_subsets(ids, mode=mode, seed=seed)


@FAST
@given(st.lists(st.integers(0, 10**5), min_size=0, max_size=2, unique=True), st.sampled_from(MODES))
def test_fewer_than_three_frames_are_refused(ids, mode):
    with pytest.raises(ValueError, match="need at least 3 labelled frames"):
        assign_subsets(ids, mode=mode)
