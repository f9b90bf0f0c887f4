"""End to end on the real ISBI volumes with the smoke preset: what runs, what is Cached."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

pytestmark = pytest.mark.slow
# CI's slice (`make test`): the first run, the cached rerun, reruns of the last stages. The CLI run from
# scratch and the reruns that retrain (epochs, --refresh, a changed byte, another split) run in `make test-all`.
ci_slice = pytest.mark.ci_slice

REPO = Path(__file__).resolve().parents[2]
STAGES = ["extract", "split", "datasets", "train", "evaluate", "predict"]


def states(summary):
    return {name: summary["stages"][name]["state"] for name in STAGES}


def only(*ran):
    return {name: ("Completed" if name in ran else "Cached") for name in STAGES}


@pytest.fixture(scope="module")
def data_dir(isbi_dir, tmp_path_factory):
    """The real volumes, linked (never copied into the repo) into a folder the tests own."""
    d = tmp_path_factory.mktemp("isbi")
    for name in ("train-volume.tif", "train-labels.tif", "test-volume.tif"):
        (d / name).symlink_to(isbi_dir / name)
    return d


@pytest.fixture(scope="module")
def pipeline(prefect_env):
    from flows.full_pipeline import full_pipeline

    def run(data_dir, work_dir, **kw):
        return full_pipeline(data_dir=str(data_dir), work_dir=str(work_dir), preset="smoke", **kw)
    return run


@pytest.fixture(scope="module")
def first_run(pipeline, data_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    return work, pipeline(data_dir, work)


@ci_slice
def test_first_run_completes_every_stage_and_writes_the_summary(first_run):
    work, summary = first_run
    assert states(summary) == only(*STAGES)
    on_disk = json.loads((work / "runs" / "latest" / "summary.json").read_text())
    assert on_disk["stages"] == summary["stages"]
    for subset in ("train", "val", "train_native", "val_native"):
        assert {"acc", "iou", "dice", "sens", "spec"} <= set(summary["metrics"][subset])
    for subset in ("train_native", "val_native"):
        scores = summary["metrics"][subset]
        assert {"membrane_dice", "v_rand", "v_info", "v_rand_filled", "v_info_filled"} <= set(scores)
        assert 0.0 <= scores["v_rand"] <= 1.0 and 0.0 <= scores["v_rand_filled"] <= 1.0
    alignment = summary["metrics"]["alignment"]
    assert alignment["applied"] and abs(alignment["dy"]) <= 1.5 and abs(alignment["dx"]) <= 1.5
    assert alignment["mse_after"] <= alignment["mse_before"]
    assert "val_native_unaligned" in summary["metrics"]
    # the test predictions got the alignment the champion's evaluation estimated
    predict_manifest = json.loads((Path(summary["stages"]["predict"]["output"]) / "manifest.json").read_text())
    assert predict_manifest["inputs"]["alignment"] == alignment
    out = summary["outputs"]
    assert len(list(Path(out["val_predictions"]).glob("*.png"))) == 10
    assert sorted(p.name for p in Path(out["val_predictions"]).glob("*.png"))[:2] == ["00000.png", "00003.png"]
    assert len(list(Path(out["test_masks"]).glob("*.png"))) == 30
    assert Path(out["checkpoint"]).is_file()
    # the challenge's submission format (README "What it does"): float32 probabilities, 30x512x512, in [0, 1]
    probs = tifffile.imread(out["test_probabilities"])
    assert probs.dtype == np.float32 and probs.shape == (30, 512, 512)
    assert probs.min() >= 0.0 and probs.max() <= 1.0
    assert 0.0 < (probs >= 0.5).mean() < 1.0  # a prediction with both classes, not a constant
    assert Path(out["test_examples"]).stat().st_size > 10_000  # a PNG figure of test predictions


@ci_slice
def test_second_run_is_all_cached(pipeline, data_dir, first_run):
    work, first = first_run
    again = pipeline(data_dir, work)
    assert states(again) == only()
    assert again["metrics"] == first["metrics"]
    assert sum(s["seconds"] for s in again["stages"].values()) < 15


@ci_slice
def test_turning_alignment_off_redoes_evaluate_and_predict_only(pipeline, data_dir, first_run):
    work, first = first_run
    plain = pipeline(data_dir, work, align=False)
    assert states(plain) == only("evaluate", "predict")
    assert plain["metrics"]["alignment"]["applied"] is False and "val_native_unaligned" not in plain["metrics"]
    # without alignment the val scores are the aligned run's "unaligned" ones
    assert plain["metrics"]["val_native"] == pytest.approx(first["metrics"]["val_native_unaligned"])
    assert states(pipeline(data_dir, work)) == only()  # and back: both are cached


@ci_slice
def test_changing_tta_scales_reruns_evaluate_and_predict_only(pipeline, data_dir, first_run):
    # README "Test-time scales": an inference setting, so evaluate and predict rerun, never training.
    # 0.75, not fullres's 0.875: a resize recipe's scaled input side is rounded to a multiple of 16
    # (unet/blocks.py _predict_resized), and smoke's 64 px times 0.875 comes back as 64, the scale 1
    work, first = first_run
    scaled = pipeline(data_dir, work, tta_scales=[0.75, 1.0])
    assert states(scaled) == only("evaluate", "predict")
    assert scaled["stages"]["train"]["output"] == first["stages"]["train"]["output"]
    assert scaled["metrics"]["tta_scales"] == [0.75, 1.0] and first["metrics"]["tta_scales"] == [1.0]
    assert scaled["metrics"]["val_native"] != first["metrics"]["val_native"]  # the second scale changed them
    predict = json.loads((Path(scaled["stages"]["predict"]["output"]) / "manifest.json").read_text())
    assert predict["inputs"]["tta_scales"] == [0.75, 1.0]
    assert states(pipeline(data_dir, work)) == only()  # and back: both are cached


@ci_slice
def test_artifacts_are_readable_through_the_client(first_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    keys = ["unet-metrics", "unet-training-history", "unet-report"]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    by_key = {a.key: a for a in found}
    assert set(by_key) == set(keys)
    rows = json.loads(by_key["unet-metrics"].data)
    assert any(r["set"] == "val (case, published)" and r["iou"] == 0.9 for r in rows)
    assert "Metrics" in by_key["unet-report"].data


def test_changing_epochs_reruns_training_and_downstream_only(pipeline, data_dir, first_run):
    work, _ = first_run
    summary = pipeline(data_dir, work, epochs=2)
    # test predictions come from the champion: they are redone only when the new model wins
    promoted = summary["champion"]["decision"] == "promoted"
    assert states(summary) == only("train", "evaluate", *(["predict"] if promoted else []))
    assert (summary["champion"]["new_score"] >= summary["champion"]["previous_score"]) == promoted


@ci_slice
def test_deleted_prediction_folder_reruns_only_predict(pipeline, data_dir, first_run):
    work, first = first_run
    shutil.rmtree(first["stages"]["predict"]["output"])
    summary = pipeline(data_dir, work)
    assert states(summary) == only("predict")
    assert len(list(Path(summary["outputs"]["test_masks"]).glob("*.png"))) == 30


def test_refresh_reruns_everything(pipeline, data_dir, first_run):
    work, _ = first_run
    assert states(pipeline(data_dir, work, refresh=True)) == only(*STAGES)


def test_one_changed_byte_of_the_volume_reruns_everything(pipeline, data_dir, first_run, tmp_path):
    work, _ = first_run
    changed = tmp_path / "data"
    changed.mkdir()
    for name in ("train-labels.tif", "test-volume.tif"):
        (changed / name).symlink_to(data_dir / name)
    raw = bytearray((data_dir / "train-volume.tif").read_bytes())
    raw[-1] ^= 0xFF  # last pixel of the last frame
    (changed / "train-volume.tif").write_bytes(bytes(raw))
    assert states(pipeline(changed, work)) == only(*STAGES)


def test_cli_second_run_reports_all_cached(data_dir, tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"),
           "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "home" / "storage")}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, str(REPO / "flows" / "full_pipeline.py"), "--data-dir", str(data_dir),
           "--work-dir", str(tmp_path / "w"), "--preset", "smoke"]
    for _ in range(2):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "w" / "runs" / "latest" / "summary.json").read_text())
    assert states(summary) == only()
    assert "test masks" in done.stdout


def test_a_new_split_rescores_the_champion_on_its_val_frames(pipeline, data_dir, first_run):
    """README "Champion": the new model and the champion are both scored on the current val frames.
    With another split the champion, trained and scored on the every-third split, is evaluated again
    on the new split's val frames, and that score is what the new model is compared with."""
    from tasks.promote import champion_score
    from tasks.stage import is_finished

    work, _ = first_run
    before = json.loads((work / "champion.json").read_text())
    summary = pipeline(data_dir, work, split="random", split_seed=5)
    assert states(summary) == only("split", "datasets", "train", "evaluate", "predict")
    datasets = "datasets:" + Path(summary["stages"]["datasets"]["output"]).name
    rescored = []
    for folder in (work / "evaluate").iterdir():
        if is_finished(folder):
            inputs = json.loads((folder / "manifest.json").read_text())["inputs"]
            if inputs["model"] == f"train:{before['model']['key']}" and inputs["datasets"] == datasets:
                rescored.append(json.loads((folder / "metrics.json").read_text()))
    assert len(rescored) == 1, "the champion was not evaluated on the new split"
    score, _ = champion_score({"metrics": rescored[0]})
    assert summary["champion"]["previous_score"] == score
    assert score != before["score"]  # other val frames, another score than the one it was promoted with
    assert (summary["champion"]["decision"] == "promoted") == (summary["champion"]["new_score"] >= score)
