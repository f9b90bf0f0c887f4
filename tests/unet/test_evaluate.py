"""Tests of unet.evaluate.native_scores on real ISBI labels."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import binary_erosion

from unet.evaluate import native_scores, read_masks


@pytest.fixture(scope="module")
def target(frames):
    return read_masks([m for _, m in frames["val"][:3]])


def test_ground_truth_scores_perfectly(target):
    got = native_scores(target.astype(np.float32), target)
    for key in ("acc", "iou", "dice", "cell_iou", "membrane_iou", "membrane_dice", "v_rand", "v_info",
                "v_rand_filled", "v_info_filled"):
        assert got[key] == pytest.approx(1.0), key


def test_thick_membranes_cost_v_rand_but_not_once_filled(target):
    # every cell shrunk by 2 px: membranes three times as thick, no cut lost
    thick = np.stack([binary_erosion(t, iterations=2) for t in target]).astype(np.float32)
    got = native_scores(thick, target)
    assert got["membrane_dice"] < 0.8 and got["v_rand"] < 0.95
    assert got["v_rand_filled"] > got["v_rand"] + 0.02
    assert 0.1 <= got["v_rand_filled_threshold"] <= 0.9


def test_shape_mismatch_is_a_clear_error(target):
    with pytest.raises(ValueError, match="one shape"):
        native_scores(target[:2].astype(np.float32), target)
