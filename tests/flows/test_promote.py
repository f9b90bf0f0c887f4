"""The champion rule: the mean of val IoU, membrane Dice and V_rand decides, not cell IoU alone.

The val scores are the ones of docs/results.md: the one-section champion with test-time scales and
the 2.5D model that cell IoU alone promoted over it (0.001 better in IoU, 0.04 worse in V_rand).
That the old champion is re-scored on the current val frames is tested end to end
(tests/flows/test_full_pipeline.py, test_a_new_split_rescores_the_champion_on_its_val_frames).
"""
import json
import shutil
from pathlib import Path

import pytest
from prefect import flow

from tasks.promote import champion_score, promote_champion, read_champion

CHAMPION = {"iou": 0.9091, "membrane_dice": 0.8344, "v_rand": 0.9261}
SECTIONS3 = {"iou": 0.9102, "membrane_dice": 0.8353, "v_rand": 0.8856}


def _evaluation(scores: dict, output: str) -> dict:
    return {"metrics": {"val_native": {**scores, "acc": 0.92}}, "model_output": output}


def _model(key: str, tmp_path) -> dict:
    return {"stage": "train", "key": key, "output": str(tmp_path / "train" / key)}


@flow
def _promote(work_dir: str, key: str, new: dict, champion: dict | None, old: dict | None) -> dict:
    """promote_champion of a model ``key`` scoring ``new`` against ``champion`` scoring ``old``."""
    return promote_champion(work_dir, _model(key, Path(work_dir)), {}, _evaluation(new, key), champion,
                            None if old is None else _evaluation(old, champion["model"]["key"]), "test-run")


@pytest.fixture
def decide(prefect_env, tmp_path):
    """``decide(new, old)``: with ``old``, a model "old" scoring ``old`` is first promoted as the first
    model (champion.json names it); then the model "new" scoring ``new`` is decided against it.
    Returns the decision and champion.json's bytes before it (None without ``old``)."""
    def run(new: dict, old: dict | None) -> tuple[dict, bytes | None]:
        champion, before = None, None
        if old is not None:
            champion = _promote(str(tmp_path), "old", old, None, None)["champion"]
            before = (tmp_path / "champion.json").read_bytes()
            assert json.loads(before)["model"]["key"] == "old"
        return _promote(str(tmp_path), "new", new, champion, old), before
    return run


def test_score_is_the_mean_of_the_three_numbers():
    score, parts = champion_score(_evaluation(CHAMPION, "x"))
    assert parts == CHAMPION
    assert score == pytest.approx((0.9091 + 0.8344 + 0.9261) / 3)


def test_higher_iou_with_a_much_lower_v_rand_keeps_the_champion_and_its_record(decide, tmp_path):
    # the kept path: a worse model (on the mean) leaves champion.json byte for byte as it was
    decision, before = decide(SECTIONS3, CHAMPION)
    assert decision["decision"] == "kept"
    assert decision["new_val_iou"] > decision["champion_val_iou"]
    assert decision["new_score"] < decision["champion_score"]
    assert decision["champion"]["model"]["key"] == "old"
    assert (tmp_path / "champion.json").read_bytes() == before


def test_better_on_the_mean_is_promoted_and_recorded(decide, tmp_path):
    decision, _ = decide(CHAMPION, SECTIONS3)
    assert decision["decision"] == "promoted" and decision["new_score"] > decision["champion_score"]
    record = json.loads((tmp_path / "champion.json").read_text())
    assert record["model"]["key"] == "new"
    assert (record["val_iou"], record["val_membrane_dice"], record["val_v_rand"]) == tuple(CHAMPION.values())


def test_a_tie_promotes_the_new_model(decide, tmp_path):
    # README: the new model replaces the champion when its score "is at least the champion's"
    decision, _ = decide(dict(CHAMPION), CHAMPION)
    assert decision["new_score"] == decision["champion_score"]
    assert decision["decision"] == "promoted"
    assert json.loads((tmp_path / "champion.json").read_text())["model"]["key"] == "new"


def test_the_first_model_is_promoted(decide, tmp_path):
    decision, _ = decide(SECTIONS3, None)
    assert decision["decision"] == "promoted" and decision["champion_score"] is None
    assert json.loads((tmp_path / "champion.json").read_text())["model"]["key"] == "new"


def test_a_champion_whose_folder_was_deleted_gives_way_to_the_new_model(prefect_env, tmp_path):
    @flow
    def read() -> dict | None:
        return read_champion(str(tmp_path))

    assert read() is None  # no champion.json yet
    _promote(str(tmp_path), "old", CHAMPION, None, None)
    folder = tmp_path / "train" / "old"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")  # a finished stage folder (tasks.stage.is_finished)
    assert read()["model"]["key"] == "old"
    shutil.rmtree(folder)
    assert read() is None
    # the flow then decides with no champion: the new model takes its place, however it scores
    decision = _promote(str(tmp_path), "new", SECTIONS3, None, None)
    assert decision["decision"] == "promoted"
    assert json.loads((tmp_path / "champion.json").read_text())["model"]["key"] == "new"
