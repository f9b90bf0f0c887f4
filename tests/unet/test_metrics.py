"""Tests of unet.metrics: hand-worked values and independent re-computations."""
from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import label

from unet.case_metric import CaseMetrics
from unet.metrics import (
    CASE_METRICS,
    ConfusionCounts,
    case_scores,
    confusion_counts,
    confusion_scores,
    segmentation_scores,
    v_info,
    v_rand,
)

# 3x3 example used by several tests (cell = 1).
PRED = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0]])
TARGET = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1]])
# By hand: p*t is 1 at (0,0), (1,1) -> inter = 2; sum(p) = 3, sum(t) = 4, sum(1-t) = 5.
# p == t at 6 of 9 pixels (wrong: (0,1), (1,0), (2,2)) -> acc = 2/3.
# iou = 2 / (7 - 2) = 2/5; dice = 2*2 / 7 = 4/7; sens = 2/4 = 1/2;
# (1-t)(1-p) = 1 at (0,2), (1,2), (2,0), (2,1) -> spec = 4/5.
# Confusion: tp = 2, fp = 1 ((0,1)), fn = 2 ((1,0), (2,2)), tn = 4.


# --------------------------------------------------------------------------- case_scores


def test_case_scores_hand_worked_3x3():
    s = 1e-5
    got = case_scores(PRED, TARGET, smooth=s)
    assert got == pytest.approx(
        {"acc": 6 / 9, "iou": 2 / (5 + s), "dice": 4 / (7 + s), "sens": 2 / (4 + s), "spec": 4 / (5 + s)},
        rel=1e-12,
    )
    assert got == pytest.approx({"acc": 2 / 3, "iou": 0.4, "dice": 4 / 7, "sens": 0.5, "spec": 0.8}, rel=1e-4)


def test_case_scores_hand_worked_2x2_empty_cell_class_scores_near_zero():
    # pred all membrane, target: one cell pixel. inter = 0 -> iou = dice = sens = 0;
    # acc = 3/4; spec = 3 / (3 + s).
    got = case_scores(np.zeros((2, 2)), np.array([[0, 0], [0, 1]]))
    assert got == pytest.approx({"acc": 0.75, "iou": 0.0, "dice": 0.0, "sens": 0.0, "spec": 3 / (3 + 1e-5)})


def test_case_scores_accepts_bool_and_rejects_bad_input():
    assert case_scores(PRED.astype(bool), TARGET.astype(bool)) == case_scores(PRED, TARGET)
    with pytest.raises(ValueError, match="same shape"):
        case_scores(PRED, TARGET[:2])
    with pytest.raises(ValueError, match="binary"):
        case_scores(PRED * 0.7, TARGET)
    with pytest.raises(ValueError, match="binary"):
        case_scores(PRED, TARGET * 255)
    with pytest.raises(ValueError, match="smooth"):
        case_scores(PRED, TARGET, smooth=0.0)


# --------------------------------------------------------------------------- CaseMetrics


def _batch(rng: np.random.Generator, n: int = 3, h: int = 5, w: int = 6) -> tuple[np.ndarray, np.ndarray]:
    prob = rng.random((n, 1, h, w)).astype(np.float32)
    prob[0, 0, 0, :3] = [0.5, 0.5000001, 0.4999999]  # values at the rounding edge
    mask = (rng.random((n, 1, h, w)) < 0.7).astype(np.float32)
    return prob, mask


def test_case_metrics_is_mean_of_per_image_case_scores():
    rng = np.random.default_rng(0)
    prob, mask = _batch(rng)
    m = CaseMetrics()
    m.clear()
    m.update(prob, mask)
    got = m.eval()
    per_image = [case_scores((p[0] > 0.5).astype(int), t[0]) for p, t in zip(prob, mask)]
    expected = {k: np.mean([s[k] for s in per_image]) for k in CASE_METRICS}
    assert set(got) == set(CASE_METRICS)
    assert got == pytest.approx(expected, rel=1e-12)


def test_case_metrics_rounds_at_half_like_np_round():
    m = CaseMetrics()
    ones = np.ones((1, 1, 2, 2), np.float32)
    m.update(ones * 0.5, ones * 0)  # np.round(0.5) == 0 -> all membrane -> acc 1
    assert m.eval()["acc"] == 1.0
    m.clear()
    m.update(ones * 0.51, ones)  # rounds to 1 -> all cell -> acc 1
    assert m.eval()["acc"] == 1.0
    m.clear()
    m.update(ones * 0.49, ones)  # rounds to 0 -> every pixel wrong
    assert m.eval()["acc"] == 0.0


def test_case_metrics_accumulates_over_updates_and_accepts_tensors():
    from mindspore import Tensor

    rng = np.random.default_rng(1)
    prob, mask = _batch(rng, n=4)
    whole = CaseMetrics()
    whole.update(prob, mask)
    parts = CaseMetrics()
    parts.update(Tensor(prob[:1]), Tensor(mask[:1]))
    parts.update(Tensor(prob[1:]), Tensor(mask[1:]))
    assert parts.eval() == pytest.approx(whole.eval(), rel=1e-12)


def test_case_metrics_errors():
    m = CaseMetrics()
    with pytest.raises(RuntimeError):
        m.eval()
    with pytest.raises(ValueError, match="same shape"):
        m.update(np.zeros((2, 1, 4, 4)), np.zeros((2, 1, 4, 5)))
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        m.update(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="binary"):
        m.update(np.zeros((1, 1, 2, 2)), np.full((1, 1, 2, 2), 255))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m.update(np.full((1, 1, 2, 2), 3.0), np.zeros((1, 1, 2, 2)))
    m.update(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2)))
    m.clear()
    with pytest.raises(RuntimeError):
        m.eval()


def test_case_metrics_in_model_eval():
    import mindspore.dataset as ds
    from mindspore import nn
    from mindspore.train import Model

    class Identity(nn.Cell):
        def construct(self, x):
            return x

    rng = np.random.default_rng(2)
    prob, mask = _batch(rng, n=4, h=8, w=8)
    data = ds.NumpySlicesDataset({"image": prob, "label": mask}, shuffle=False).batch(2)
    model = Model(Identity(), loss_fn=nn.BCELoss(reduction="mean"), metrics={"case": CaseMetrics()})
    got = model.eval(data, dataset_sink_mode=False)["case"]
    direct = CaseMetrics()
    direct.update(prob, mask)
    assert got == pytest.approx(direct.eval(), rel=1e-9)


# --------------------------------------------------------------------------- confusion


def test_confusion_counts_hand_worked_and_addition():
    c = confusion_counts(PRED, TARGET)
    assert c == ConfusionCounts(tp=2, fp=1, fn=2, tn=4)
    assert c.total == 9
    assert c + c == ConfusionCounts(4, 2, 4, 8)
    assert sum([c, c, c]) == ConfusionCounts(6, 3, 6, 12)
    stack_p, stack_t = np.stack([PRED, 1 - PRED]), np.stack([TARGET, TARGET])
    assert confusion_counts(stack_p, stack_t) == c + confusion_counts(1 - PRED, TARGET)


def test_confusion_counts_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        confusion_counts(PRED, TARGET.T[:2])
    with pytest.raises(ValueError, match="binary"):
        confusion_counts(PRED, TARGET * 2)
    with pytest.raises(ValueError, match="non-negative"):
        ConfusionCounts(tp=-1)


def test_confusion_scores_hand_worked():
    # tp = 6, fp = 2, fn = 3, tn = 9 (20 pixels):
    # acc = 15/20; cell: iou = 6/11, dice = 12/17, precision = 6/8, recall = 6/9;
    # membrane (tp_m = tn = 9, fp_m = fn = 3, fn_m = fp = 2): iou = 9/14, dice = 18/23,
    # precision = 9/12, recall = 9/11; balanced accuracy = (6/9 + 9/11) / 2 = 49/66.
    got = confusion_scores(ConfusionCounts(tp=6, fp=2, fn=3, tn=9))
    assert got == pytest.approx(
        {
            "acc": 0.75,
            "cell_iou": 6 / 11,
            "cell_dice": 12 / 17,
            "cell_precision": 0.75,
            "cell_recall": 2 / 3,
            "membrane_iou": 9 / 14,
            "membrane_dice": 18 / 23,
            "membrane_precision": 0.75,
            "membrane_recall": 9 / 11,
            "balanced_accuracy": 49 / 66,
        },
        rel=1e-12,
    )


def test_confusion_scores_zero_over_zero_is_one():
    # All membrane, predicted all membrane: the cell sets are both empty -> 1.0, not NaN.
    got = confusion_scores(ConfusionCounts(tn=10))
    assert got["cell_iou"] == got["cell_dice"] == got["cell_precision"] == got["cell_recall"] == 1.0
    assert got["membrane_iou"] == got["acc"] == got["balanced_accuracy"] == 1.0
    # Cells present but none predicted: recall 0, precision 0/0 = 1, iou 0.
    got = confusion_scores(ConfusionCounts(fn=3, tn=7))
    assert (got["cell_recall"], got["cell_precision"], got["cell_iou"]) == (0.0, 1.0, 0.0)
    with pytest.raises(ValueError):
        confusion_scores((1, 2, 3, 4))  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(5))
def test_confusion_scores_match_set_computation(seed):
    rng = np.random.default_rng(seed)
    pred = (rng.random((7, 9)) < rng.uniform(0.2, 0.8)).astype(np.uint8)
    target = (rng.random((7, 9)) < rng.uniform(0.2, 0.8)).astype(np.uint8)
    got = confusion_scores(confusion_counts(pred, target))
    p_cell = {i for i, v in enumerate(pred.ravel()) if v == 1}
    t_cell = {i for i, v in enumerate(target.ravel()) if v == 1}
    everything = set(range(pred.size))
    p_mem, t_mem = everything - p_cell, everything - t_cell
    assert got["cell_iou"] == pytest.approx(len(p_cell & t_cell) / len(p_cell | t_cell))
    assert got["membrane_dice"] == pytest.approx(2 * len(p_mem & t_mem) / (len(p_mem) + len(t_mem)))
    same = 0
    for a, b in zip(pred.ravel().tolist(), target.ravel().tolist()):
        same += a == b
    assert got["acc"] == pytest.approx(same / pred.size)
    # The case's smoothed iou is the exact cell iou up to the smoothing constant.
    assert case_scores(pred, target)["iou"] == pytest.approx(got["cell_iou"], rel=1e-5)


# --------------------------------------------------------------------------- ISBI scores


def _cells(h: int = 12, w: int = 12) -> np.ndarray:
    """Four square cells separated by a one-pixel membrane cross (row 6, column 6)."""
    t = np.ones((h, w), np.uint8)
    t[6, :] = 0
    t[:, 6] = 0
    return t


def _pair_counting_rand(gt: np.ndarray, pred: np.ndarray, distinct: bool) -> float:
    """Rand F-score over gt-foreground pixels from the contingency table n_ij.

    ``distinct=False``: sum n_ij^2 / (0.5 (sum a_i^2 + sum b_j^2)) (pairs incl. self-pairs);
    ``distinct=True``: the same with n(n-1) in place of n^2 (pairs of distinct pixels).
    """
    fg = gt != 0
    g, p = gt[fg], pred[fg]
    table: dict[tuple[int, int], int] = {}
    for i, j in zip(g.tolist(), p.tolist()):
        table[(i, j)] = table.get((i, j), 0) + 1
    a: dict[int, int] = {}
    b: dict[int, int] = {}
    for (i, j), n in table.items():
        a[i] = a.get(i, 0) + n
        b[j] = b.get(j, 0) + n

    def pairs(counts):
        return sum(n * (n - 1) if distinct else n * n for n in counts)

    return pairs(table.values()) / (0.5 * (pairs(a.values()) + pairs(b.values())))


def _direct_info(gt: np.ndarray, pred: np.ndarray) -> float:
    """V_info from joint label frequencies: I = H(S) + H(T) - H(S, T)."""
    fg = gt != 0
    s, t = pred[fg], gt[fg]

    def h(*cols):
        _, counts = np.unique(np.stack(cols, axis=1), axis=0, return_counts=True)
        q = counts / counts.sum()
        return -np.sum(q * np.log2(q))

    h_s, h_t = h(s), h(t)
    mutual = h_s + h_t - h(s, t)
    prec, rec = mutual / h_s, mutual / h_t
    return 2 * prec * rec / (prec + rec)


def test_perfect_prediction_scores_one():
    second = _cells()
    second[2, :] = 0  # splits the two upper cells again: six cells
    target = np.stack([_cells(), second])
    got = segmentation_scores(target.astype(np.float32), target)
    for t, s in got["per_threshold"].items():
        assert s == {"v_rand": 1.0, "v_info": 1.0}, t
    assert got["v_rand"] == got["v_info"] == 1.0
    assert got["v_rand_threshold"] == got["v_info_threshold"] == 0.1


def test_merging_two_cells_scores_below_one():
    target = np.ones((5, 9), np.uint8)
    target[:, 4] = 0  # two 5x4 cells, a = b = 20, N = 40
    merged = np.ones((5, 9), np.float32)  # membrane line removed: one segment
    got = segmentation_scores(merged, target, thresholds=(0.5,))
    # distinct pairs: sum n_ij(n_ij-1) = 2*20*19 = 760 (= gt side), pred side 40*39 = 1560
    assert got["v_rand"] == pytest.approx(760 / (0.5 * 760 + 0.5 * 1560))
    assert got["v_rand"] < 1.0
    # H(S) = 0 (one predicted segment), H(T) = 1 bit, I = 0 -> P = 1, R = 0 -> V_info = 0.
    assert got["v_info"] == 0.0


def test_best_threshold_selection():
    target = np.ones((9, 9), np.uint8)
    target[:, 4] = 0  # two cells separated by a membrane line
    prob = np.full((9, 9), 0.75)
    prob[:, 4] = 0.45  # membrane: predicted cell (merge) for t <= 0.4
    prob[2, 1] = prob[6, 2] = 0.62  # two weak pixels inside the left cell: holes for t >= 0.7
    # t <= 0.4: merge; t = 0.5, 0.6: perfect; t = 0.7: holes; t >= 0.8: nothing predicted.
    got = segmentation_scores(prob, target)
    assert got["v_rand_threshold"] == got["v_info_threshold"] == 0.5
    assert got["v_rand"] == got["v_info"] == 1.0
    per = got["per_threshold"]
    assert list(per) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert per[0.6] == {"v_rand": 1.0, "v_info": 1.0}
    for t in (0.4, 0.7, 0.8):
        assert per[t]["v_rand"] < 1.0 and per[t]["v_info"] < 1.0, t
    # Without the perfect thresholds the hole threshold (split only) beats the merges.
    got = segmentation_scores(prob, target, thresholds=(0.3, 0.7, 0.9))
    assert got["v_rand_threshold"] == 0.7
    assert got["v_rand"] == pytest.approx(per[0.7]["v_rand"])


@pytest.mark.parametrize("seed", range(4))
def test_v_rand_matches_pair_counting(seed):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 4, size=(6, 7))  # 0 = ignored
    pred = rng.integers(0, 5, size=(6, 7))
    assert v_rand(gt, pred) == pytest.approx(_pair_counting_rand(gt, pred, distinct=True), rel=1e-12)
    # Through segmentation_scores on a random probability map and binary target.
    prob = rng.random((2, 10, 10))
    target = (rng.random((2, 10, 10)) < 0.6).astype(np.uint8)
    got = segmentation_scores(prob, target, thresholds=(0.4,))["v_rand"]
    expected = np.mean(
        [
            _pair_counting_rand(label(t, connectivity=1), label(p >= 0.4, connectivity=1), distinct=True)
            for p, t in zip(prob, target)
        ]
    )
    assert got == pytest.approx(expected, rel=1e-12)


def test_v_rand_close_to_self_pair_formula_for_large_segments():
    # The ISBI/Fiji formula counts self-pairs (n^2); scikit-image counts distinct pairs
    # (n(n-1)). With segments of hundreds of pixels the two agree closely, not exactly.
    gt = np.repeat(np.repeat(np.array([[1, 2], [3, 4]]), 20, axis=0), 20, axis=1)
    pred = gt.copy()
    pred[:, 15:25] = 5  # a wrong vertical band spanning all four cells
    mine = v_rand(gt, pred)
    assert mine < 0.9
    assert mine == pytest.approx(_pair_counting_rand(gt, pred, distinct=False), abs=5e-3)
    assert mine != _pair_counting_rand(gt, pred, distinct=False)


@pytest.mark.parametrize("seed", range(4))
def test_v_info_matches_direct_entropies(seed):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 3, size=(8, 8))
    pred = rng.integers(0, 6, size=(8, 8))  # H(S) != H(T): catches swapped conditional entropies
    assert v_info(gt, pred) == pytest.approx(_direct_info(gt, pred), rel=1e-9)


def test_v_info_edge_cases():
    gt = np.array([[1, 1, 0, 2, 2]])
    assert v_info(gt, np.array([[7, 7, 0, 3, 3]])) == 1.0  # relabelled, perfect
    assert v_info(gt, np.array([[4, 4, 4, 4, 4]])) == 0.0  # everything merged
    one_cell = np.array([[1, 1, 1, 1]])
    assert v_info(one_cell, np.array([[5, 5, 5, 5]])) == 1.0  # H(S) = H(T) = 0
    assert v_info(one_cell, np.array([[1, 1, 2, 2]])) == 0.0  # one cell split: P = 0, R = 1
    empty = np.zeros((3, 3), int)
    assert v_info(empty, np.ones((3, 3), int)) == 1.0 and v_rand(empty, np.ones((3, 3), int)) == 1.0


def test_single_frame_and_frame_mean():
    rng = np.random.default_rng(7)
    prob = rng.random((2, 10, 10))
    target = (rng.random((2, 10, 10)) < 0.6).astype(np.uint8)
    ts = (0.3, 0.6)
    stack = segmentation_scores(prob, target, thresholds=ts)["per_threshold"]
    frames = [segmentation_scores(p, t, thresholds=ts)["per_threshold"] for p, t in zip(prob, target)]
    for t in ts:
        for k in ("v_rand", "v_info"):
            assert stack[t][k] == pytest.approx((frames[0][t][k] + frames[1][t][k]) / 2)


def test_thresholds_are_rounded_python_floats():
    target = _cells()
    got = segmentation_scores(target * 0.9, target, thresholds=np.array([0.3000001, 0.7]))
    assert list(got["per_threshold"]) == [0.3, 0.7]
    assert all(type(t) is float for t in got["per_threshold"])
    assert type(got["v_rand_threshold"]) is float


@pytest.mark.parametrize(
    ("prob", "target", "kwargs", "match"),
    [
        (np.zeros((2, 4, 4)), np.zeros((2, 4, 5)), {}, "same shape"),
        (np.zeros((4, 4)), np.full((4, 4), 255), {}, "binary"),
        (np.full((4, 4), 1.5), np.zeros((4, 4)), {}, r"\[0, 1\]"),
        (np.full((4, 4), np.nan), np.zeros((4, 4)), {}, "finite"),
        (np.zeros((1, 2, 4, 4)), np.zeros((1, 2, 4, 4)), {}, r"\[N, H, W\]"),
        (np.zeros((4, 4)), np.zeros((4, 4)), {"thresholds": ()}, "empty"),
        (np.zeros((4, 4)), np.zeros((4, 4)), {"thresholds": (0.5, 1.2)}, r"\[0, 1\]"),
        (np.zeros((4, 4)), np.zeros((4, 4)), {"thresholds": (0.5, 0.501)}, "distinct"),
    ],
)
def test_segmentation_scores_rejects_bad_input(prob, target, kwargs, match):
    with pytest.raises(ValueError, match=match):
        segmentation_scores(prob, target, **kwargs)


def test_label_functions_reject_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        v_rand(np.ones((3, 3), int), np.ones((3, 4), int))
    with pytest.raises(ValueError, match="non-negative ints"):
        v_info(np.ones((3, 3)), np.ones((3, 3), int))


# --------------------------------------------------------------------------- found by mutation testing


def test_false_merges_and_splits_of_single_pixel_segments_score_zero():
    # V_rand = (sum n_ij^2 - N) / (0.5 (sum a_i^2 - N) + 0.5 (sum b_j^2 - N)): the 1.0 shortcut is
    # only for both sides all single pixels (0/0); one side alone gives 0 / positive = 0
    dots = np.array([[1, 0, 2, 0, 3, 0, 4]])  # four one-pixel cells
    assert v_rand(dots, np.where(dots > 0, 9, 0)) == 0.0  # all merged into one
    assert v_rand(dots, dots * 5) == 1.0  # relabelled: nothing wrong
    one_cell = np.ones((2, 3), int)
    assert v_rand(one_cell, np.arange(1, 7).reshape(2, 3)) == 0.0  # split into single pixels


def test_v_rand_and_v_info_ignore_what_the_prediction_does_on_gt_membrane():
    # foreground-restricted: predicted cells growing over gt boundary pixels (label 0) cost nothing
    gt = np.array([[1, 1, 0, 2, 2]])
    grown = np.array([[1, 1, 1, 2, 2]])
    assert v_rand(gt, grown) == 1.0 and v_info(gt, grown) == 1.0


def test_v_info_of_a_prediction_independent_of_the_gt_is_zero():
    # H(S) = H(T) = 1 bit and I(S;T) = 0, so P = R = 0: the docstring's "V_info = 0 when P + R = 0"
    gt = np.array([[1, 1], [2, 2]])
    assert v_info(gt, np.array([[1, 2], [1, 2]])) == 0.0


def test_thresholds_0_and_1_are_valid_and_a_pixel_at_the_threshold_is_cell():
    # segmentation_scores segments cell_prob >= t, like unet.segment.segment_cells
    prob = np.array([[0.5, 0.2, 0.5]])
    target = np.array([[1, 0, 1]])
    got = segmentation_scores(prob, target, thresholds=(0.0, 0.5, 1.0))
    assert got["per_threshold"][0.5]["v_rand"] == 1.0  # the two 0.5 pixels are two cells
    assert got["per_threshold"][0.0]["v_rand"] < 1.0  # everything is one cell
    assert got["v_rand_threshold"] == 0.5 and set(got["per_threshold"]) == {0.0, 0.5, 1.0}


def test_confusion_counts_are_ints_only():
    with pytest.raises(ValueError, match=r"ConfusionCounts.tp must be a non-negative int, got True"):
        ConfusionCounts(tp=True)
    with pytest.raises(ValueError, match=r"ConfusionCounts.fn must be a non-negative int, got 1.0"):
        ConfusionCounts(fn=1.0)
    c = ConfusionCounts(tp=np.int64(2), tn=3)
    assert type(c.tp) is int and sum([c, c]) == ConfusionCounts(tp=4, tn=6)
    with pytest.raises(TypeError):
        1 + c  # only sum()'s start, 0, adds to counts


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: case_scores(np.full((2, 2), 2), np.zeros((2, 2))), ValueError,
         r"pred must be binary \(0/1\), found values such as \[2\]"),
        (lambda: case_scores(np.zeros((2, 2)), np.full((2, 2), 2)), ValueError, "target must be binary"),
        (lambda: case_scores(np.zeros((2, 2)), np.zeros((2, 3))), ValueError,
         r"pred and target must have the same shape, got \(2, 2\) and \(2, 3\)"),
        (lambda: case_scores(np.zeros(0), np.zeros(0)), ValueError, r"pred and target are empty \(shape \(0,\)\)"),
        (lambda: CaseMetrics(smooth=0.0), ValueError, "smooth must be a finite positive number, got 0.0"),
        (lambda: CaseMetrics(smooth=float("inf")), ValueError, "smooth must be a finite positive number, got inf"),
        (lambda: CaseMetrics().eval(), RuntimeError,
         r"CaseMetrics.eval\(\) called before any update\(\): no images to score"),
        (lambda: confusion_counts(np.array([["a"]]), np.zeros((1, 1))), ValueError,
         "pred must be numeric or bool, got dtype <U1"),
        (lambda: confusion_counts(np.zeros((1, 1)), np.array([[3]])), ValueError, "target must be binary"),
        (lambda: confusion_counts(np.zeros((2, 2)), np.zeros((3, 2))), ValueError,
         "pred and target must have the same shape"),
        (lambda: confusion_counts(np.arange(2, 9), np.zeros(7)), ValueError,
         r"pred must be binary \(0/1\), found values such as \[2, 3, 4, 5, 6\]$"),  # the first five
        (lambda: confusion_scores({"tp": 1}), ValueError, "c must be a ConfusionCounts, got dict"),
        (lambda: v_rand(np.ones((2, 2)), np.ones((2, 2), int)), ValueError, "gt_labels must be a label image"),
        (lambda: v_rand(np.ones((2, 2), int), -np.ones((2, 2), int)), ValueError, "pred_labels must be a label image"),
        (lambda: v_rand(np.ones((2, 2), int), np.ones((2, 3), int)), ValueError,
         "gt_labels and pred_labels must have the same shape"),
        (lambda: v_info(np.ones((2, 2)), np.ones((2, 2), int)), ValueError, "gt_labels must be a label image"),
        (lambda: v_info(np.ones((2, 2), int), -np.ones((2, 2), int)), ValueError, "pred_labels must be a label image"),
        (lambda: v_info(np.ones((2, 2), int), np.ones((2, 3), int)), ValueError,
         "gt_labels and pred_labels must have the same shape"),
        (lambda: segmentation_scores(np.array([["a"]]), np.zeros((1, 1))), ValueError,
         "cell_prob must be numeric, got dtype <U1"),
        (lambda: segmentation_scores(np.full((2, 2), 2.0), np.zeros((2, 2))), ValueError,
         r"cell_prob must be probabilities in \[0, 1\]"),
        (lambda: segmentation_scores(np.zeros((2, 2)), np.full((2, 2), 2)), ValueError, "target must be binary"),
        (lambda: segmentation_scores(np.zeros((2, 2)), np.zeros((2, 3))), ValueError,
         "cell_prob and target must have the same shape"),
        (lambda: segmentation_scores(np.zeros((2, 2)), np.zeros((2, 2)), thresholds=()), ValueError,
         "^thresholds is empty$"),
        (lambda: segmentation_scores(np.zeros((2, 2)), np.zeros((2, 2)), thresholds=("a",)), ValueError,
         r"thresholds must be a sequence of numbers, got \('a',\)"),
    ],
)
def test_errors_name_the_argument_and_what_was_expected(call, error, message):
    with pytest.raises(error, match=message if message.startswith("^") else "^" + message):
        call()


# v_rand/v_info compute both scores from one contingency table of their own; scikit-image's
# adapted_rand_error and variation_of_information are the reference they must equal (to round-off),
# on real ISBI frames thresholded at several levels (the segmentations the evaluate stage scores),
# with the membrane filled, and on random label images with large and sparse label values.
def test_scores_equal_scikit_image_on_real_frames(isbi_dir):
    import tifffile
    from skimage.metrics import adapted_rand_error, variation_of_information
    from skimage.segmentation import expand_labels

    labels = tifffile.imread(isbi_dir / "train-labels.tif")[:3]
    images = tifffile.imread(isbi_dir / "train-volume.tif")[:3]
    for mask, image in zip(labels, images):
        gt = label(mask > 127, connectivity=1)
        for t in (60, 120, 180):
            pred = label(image >= t, connectivity=1)
            for seg in (pred, expand_labels(pred, distance=1024)):
                want_rand = 1.0 - adapted_rand_error(gt, seg, ignore_labels=(0,))[0]
                assert v_rand(gt, seg) == pytest.approx(want_rand, rel=1e-12, abs=1e-12)
                h_s_given_t = variation_of_information(gt, seg, ignore_labels=(0,))[0]
                fg = gt != 0
                h = {}
                for name, lab in (("s", seg[fg]), ("t", gt[fg])):
                    q = np.unique(lab, return_counts=True)[1] / fg.sum()
                    h[name] = -np.sum(q * np.log2(q))
                mutual = min(max(h["s"] - h_s_given_t, 0.0), h["s"], h["t"])
                p, r = mutual / h["s"], mutual / h["t"]
                assert v_info(gt, seg) == pytest.approx(2 * p * r / (p + r), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_scores_equal_scikit_image_on_sparse_label_values(seed):
    # random labels against scikit-image; then the same segmentations with huge, sparse label values
    # (the table is built from renumbered labels then; scikit-image would need a dense table of
    # 10^10 entries) must score the same
    from skimage.metrics import adapted_rand_error

    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 6, (40, 50))
    pred = rng.integers(0, 9, (40, 50))
    assert v_rand(gt, pred) == pytest.approx(1.0 - adapted_rand_error(gt, pred, ignore_labels=(0,))[0], rel=1e-12)
    big_gt, big_pred = gt * 1_000_003, pred * 2_000_000_011 + 5
    assert v_rand(big_gt, big_pred) == pytest.approx(v_rand(gt, pred), rel=1e-12)
    assert v_info(big_gt, big_pred) == pytest.approx(v_info(gt, pred), rel=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_scores_with_thousands_of_segments_on_both_sides(seed):
    # so many segments on both sides that a dense table would not pay: the pairs are counted with
    # np.unique instead of np.bincount; scikit-image and the direct entropies are the reference
    from skimage.metrics import adapted_rand_error

    rng = np.random.default_rng(seed)
    gt = rng.permutation(64 * 64).reshape(64, 64) % 3000 + 1  # 3000 segments, some of two pixels
    pred = rng.permutation(64 * 64).reshape(64, 64) % 2500
    assert v_rand(gt, pred) == pytest.approx(1.0 - adapted_rand_error(gt, pred, ignore_labels=(0,))[0], rel=1e-12)
    assert v_info(gt, pred) == pytest.approx(_direct_info(gt, pred), rel=1e-9)
