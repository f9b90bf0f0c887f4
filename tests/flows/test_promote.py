"""The champion rule: the mean of val IoU, membrane Dice and V_rand decides, not cell IoU alone.

The val scores are the ones of docs/results.md: the one-section champion with test-time scales and
the 2.5D model that cell IoU alone promoted over it (0.001 better in IoU, 0.04 worse in V_rand).
"""
import json

import pytest
from prefect import flow

from tasks.promote import champion_score, promote_champion

CHAMPION = {"iou": 0.9091, "membrane_dice": 0.8344, "v_rand": 0.9261}
SECTIONS3 = {"iou": 0.9102, "membrane_dice": 0.8353, "v_rand": 0.8856}


def _evaluation(scores: dict, output: str) -> dict:
    return {"metrics": {"val_native": {**scores, "acc": 0.92}}, "model_output": output}


def _model(key: str, tmp_path) -> dict:
    return {"stage": "train", "key": key, "output": str(tmp_path / "train" / key)}


@pytest.fixture
def decide(prefect_env, tmp_path):
    @flow
    def promote(new: dict, old: dict | None) -> dict:
        champion = None if old is None else {"model": _model("old", tmp_path), "recipe": {}}
        return promote_champion(str(tmp_path), _model("new", tmp_path), {}, _evaluation(new, "new"), champion,
                                None if old is None else _evaluation(old, "old"), "test-run")
    return promote


def test_score_is_the_mean_of_the_three_numbers():
    score, parts = champion_score(_evaluation(CHAMPION, "x"))
    assert parts == CHAMPION
    assert score == pytest.approx((0.9091 + 0.8344 + 0.9261) / 3)


def test_higher_iou_with_a_much_lower_v_rand_keeps_the_champion(decide, tmp_path):
    decision = decide(SECTIONS3, CHAMPION)
    assert decision["decision"] == "kept"
    assert decision["new_val_iou"] > decision["champion_val_iou"]
    assert not (tmp_path / "champion.json").exists()


def test_better_on_the_mean_is_promoted_and_recorded(decide, tmp_path):
    decision = decide(CHAMPION, SECTIONS3)
    assert decision["decision"] == "promoted" and decision["new_score"] > decision["champion_score"]
    record = json.loads((tmp_path / "champion.json").read_text())
    assert record["model"]["key"] == "new"
    assert (record["val_iou"], record["val_membrane_dice"], record["val_v_rand"]) == tuple(CHAMPION.values())


def test_the_first_model_is_promoted(decide, tmp_path):
    decision = decide(SECTIONS3, None)
    assert decision["decision"] == "promoted" and decision["champion_score"] is None
    assert json.loads((tmp_path / "champion.json").read_text())["model"]["key"] == "new"
