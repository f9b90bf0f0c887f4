"""Interrupted and concurrent runs of ``python flows/full_pipeline.py`` (subprocesses, smoke
preset, a 256x256 cut of the real stacks: 15 labelled and 12 test frames).

- SIGKILL during training: the next run resumes from the last finished epoch; nothing of the
  killed stage is taken as finished. SIGKILL during predict's writes: the next run redoes predict
  and nothing else.
- Two runs at once on one work directory and one Prefect home: both finish, the work is done once
  (their result is also the uninterrupted reference of the other tests).
- SIGTERM, SIGHUP, Ctrl-C (SIGINT): the run stops with one line and exit code 143, 143, 130, and its
  temporary Prefect server is gone; before the flow starts as well.
- The same seed from scratch: the same split, the same frames and (once augmentation is seeded)
  the same metrics.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from robustness_support import (STAGES, Pipeline, error_lines, finished, new_home, only, small_data, states,
                                stop_leftovers, summary_of, wait_for, wait_gone)

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
EPOCHS = 8
ARGS = ["--preset", "smoke", "--epochs", str(EPOCHS), "--split", "random", "--split-seed", "7"]
TEST_FRAMES = 12
# A run resumed after a SIGKILL equals the uninterrupted reference exactly: every history number and
# every metric. Each epoch's sample order and augmentation are seeded by (seed, epoch, sample)
# (unet/data.py) and last.ckpt holds the weights, BatchNorm statistics and Adam's state; measured in
# process, max difference 0.0 in history and checkpoints (tests/unet/test_train_infer.py
# test_resume_after_an_interruption_is_bit_identical_to_an_uninterrupted_training). This replaces
# tolerances of 0.03 on loss and val IoU from when the augmentation was unseeded.
# Bit-identical training is what seeded augmentation gives (measured: identical checkpoints).
SAME_SEED_TOLERANCE = 1e-6


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): _sha(p) for p in sorted(folder.rglob("*.png"))}


def _history_rows(path: Path) -> int:
    try:
        return max(0, len(path.read_text().splitlines()) - 1)
    except OSError:
        return 0


def _partial_history(work: Path) -> list[Path]:
    return sorted((work / "train").glob("*.partial/history.csv"))


def _checkpoint_epoch(path: Path) -> int:
    import mindspore as ms

    return int(ms.load_checkpoint(str(path))["state_epoch"].asnumpy())


@pytest.fixture(scope="module")
def data(isbi, tmp_path_factory) -> Path:
    return small_data(tmp_path_factory.mktemp("data"), isbi, frames=15, test=TEST_FRAMES, side=256)


@pytest.fixture(scope="module")
def module_pipeline(tmp_path_factory, migrated_db):
    """Pipelines with their own Prefect homes, for module-scoped scenarios; leftovers stopped."""
    made = []

    def make(name: str) -> Pipeline:
        root = tmp_path_factory.mktemp(name)
        made.append(new_home(root / "prefect-home", migrated_db))
        return Pipeline(made[-1], root / "logs")

    yield make
    for home in made:
        stop_leftovers(home)


@pytest.fixture(scope="module")
def reference(data, module_pipeline, tmp_path_factory) -> dict:
    """Two runs started at once on one work directory and one Prefect home (one user's two
    terminals: each run starts its own temporary server on the same database). Their result is
    the uninterrupted run that later runs are compared with."""
    pipe = module_pipeline("reference")
    work = tmp_path_factory.mktemp("reference-work")
    args = ["--data-dir", str(data), "--work-dir", str(work), *ARGS]
    runs = [pipe.start(args, name) for name in ("a", "b")]
    for proc in runs:
        if proc.wait(600) != 0:
            pytest.fail(f"run {proc.name} failed:\n{pipe.output(proc)[1][-3000:]}")
    summary = summary_of(work)
    train = Path(summary["stages"]["train"]["output"])
    return {"pipe": pipe, "work": work, "runs": [(proc.returncode, *pipe.output(proc)) for proc in runs],
            "summaries": [json.loads(p.read_text()) for p in sorted((work / "runs").glob("*/summary.json"))
                          if p.parent.name != "latest"],
            "summary": summary, "history": pd.read_csv(train / "history.csv"),
            "split_csv": (Path(summary["stages"]["split"]["output"]) / "split.csv").read_bytes(),
            "frames": _hashes(Path(summary["stages"]["extract"]["output"]))}


def test_two_runs_at_once_share_the_work(reference):
    """Stage folders are locked per key: the second run waits and reuses what the first computed;
    neither corrupts the other's outputs."""
    work = reference["work"]
    for code, out, err in reference["runs"]:
        assert code == 0, err[-3000:]
        assert "Traceback" not in err and "database is locked" not in err
    trained = sum(len(re.findall(rf"\bepoch 1/{EPOCHS}\b", err)) for _, _, err in reference["runs"])
    assert trained == 1, f"the model was trained {trained} times"
    assert len(reference["summaries"]) == 2
    a, b = reference["summaries"]
    assert {k: v["output"] for k, v in a["stages"].items()} == {k: v["output"] for k, v in b["stages"].items()}
    assert a["metrics"] == b["metrics"]
    for stage in STAGES:
        folder = Path(a["stages"][stage]["output"])
        assert [p.name for p in (work / stage).iterdir()] == [folder.name], stage
        assert json.loads((folder / "manifest.json").read_text())["key"] == folder.name
    history = pd.read_csv(Path(a["stages"]["train"]["output"]) / "history.csv")
    assert history["epoch"].tolist() == list(range(1, EPOCHS + 1))
    assert len(list(Path(a["outputs"]["test_masks"]).glob("*.png"))) == TEST_FRAMES
    assert tifffile.imread(a["outputs"]["test_probabilities"]).shape == (TEST_FRAMES, 256, 256)
    champion = json.loads((work / "champion.json").read_text())
    assert champion["model"]["output"] == a["stages"]["train"]["output"]
    assert (work / "runs" / "latest").resolve().name in {a["run"], b["run"]}


def _augmentation_is_seeded() -> bool:
    from unet.data import train_transforms
    from unet.recipes import get_preset

    return getattr(train_transforms(get_preset("smoke")), "seed", None) is not None


def test_same_seed_from_scratch(reference, data):
    """--refresh recomputes every stage in place: the split and the frames are identical; the
    metrics are identical (within SAME_SEED_TOLERANCE) once the augmentation RNG is seeded."""
    pipe, work = reference["pipe"], reference["work"]
    done = pipe.run(["--data-dir", str(data), "--work-dir", str(work), *ARGS, "--refresh"])
    assert done.returncode == 0, done.stderr[-3000:]
    again = summary_of(work)
    assert states(again) == only(*STAGES)
    assert ({k: v["output"] for k, v in again["stages"].items()}
            == {k: v["output"] for k, v in reference["summary"]["stages"].items()}), "stage keys changed"
    assert (Path(again["stages"]["split"]["output"]) / "split.csv").read_bytes() == reference["split_csv"]
    assert _hashes(Path(again["stages"]["extract"]["output"])) == reference["frames"]
    history = pd.read_csv(Path(again["stages"]["train"]["output"]) / "history.csv")
    cols = [c for c in history.columns if c.startswith(("train_", "val_")) and not c.endswith("seconds")]
    diff = float(np.abs(history[cols].to_numpy() - reference["history"][cols].to_numpy()).max())
    metric_diff = max(abs(again["metrics"][s][m] - reference["summary"]["metrics"][s][m])
                      for s in ("train", "val", "val_native") for m in ("acc", "iou", "dice"))
    if max(diff, metric_diff) > SAME_SEED_TOLERANCE and not _augmentation_is_seeded():
        pytest.xfail(f"training is not reproducible: metrics differ by up to {max(diff, metric_diff):.4f}; "
                     "unet/data.py builds the training augmentation without a seed (A.Compose(seed=None) "
                     "draws from OS entropy)")
    assert diff <= SAME_SEED_TOLERANCE, f"history differs by {diff}"
    assert metric_diff <= SAME_SEED_TOLERANCE, f"metrics differ by {metric_diff}"


@pytest.fixture(scope="module")
def kill_story(data, module_pipeline, tmp_path_factory) -> dict:
    """Run 1 is SIGKILLed after >= 3 finished epochs; run 2 resumes, then is SIGKILLed in the
    middle of predict's writes; run 3 completes. What each left behind is recorded."""
    pipe = module_pipeline("kill")
    work = tmp_path_factory.mktemp("kill-work")
    args = ["--data-dir", str(data), "--work-dir", str(work), *ARGS]
    story: dict = {"work": work, "pipe": pipe}

    first = pipe.start(args, "killed-in-training")
    wait_for(lambda: any(_history_rows(h) >= 3 for h in _partial_history(work)), first, 300,
             "3 epochs in train/<key>.partial/history.csv")
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    [partial] = sorted((work / "train").glob("*.partial"))
    story["after_first"] = {
        "partial": partial,
        # the epoch a resume starts after is the one stored inside last.ckpt; last.json is written
        # after it and is one epoch behind when the kill falls between the two writes
        "last_epoch": _checkpoint_epoch(partial / "last.ckpt"),
        "last_json_epoch": json.loads((partial / "last.json").read_text())["epoch"],
        "history": pd.read_csv(partial / "history.csv"),
        "finished": {s: [p.name for p in finished(work, s)] for s in STAGES},
        "runs": (work / "runs").exists(),
    }

    marker = work.parent / "paused-in-predict"
    second = pipe.start(args, "killed-in-predict", wrapper=[str(HERE / "run_with_fault.py")],
                        env={"FAULT": "pause-in-predict", "PAUSE_MARKER": str(marker), "PAUSE_AFTER": "5"})
    wait_for(marker.exists, second, 300, "the predict stage to write 5 files")
    second.send_signal(signal.SIGKILL)
    second.wait(30)
    story["after_second"] = {
        "finished": {s: [p.name for p in finished(work, s)] for s in STAGES},
        "predict_partial": sorted((work / "predict").glob("*.partial")),
        "predict_files": sorted(p.name for p in (work / "predict").rglob("*.png")),
        "runs": (work / "runs").exists(),
        "stderr": pipe.output(second)[1],
    }

    third = pipe.run(args)
    assert third.returncode == 0, third.stderr[-3000:]
    story["summary"] = summary_of(work)
    return story


def test_sigkill_in_training_resumes_from_the_last_finished_epoch(kill_story, reference):
    after = kill_story["after_first"]
    k = after["last_epoch"]
    assert 2 <= k < EPOCHS, f"killed after epoch {k}"
    assert after["last_json_epoch"] in (k - 1, k), (after["last_json_epoch"], k)
    # the killed run finished extract, split and datasets; train is only a partial folder
    assert {s: bool(v) for s, v in after["finished"].items()} == {
        "extract": True, "split": True, "datasets": True, "train": False, "evaluate": False, "predict": False}
    assert not after["runs"], "the killed run wrote a summary"

    summary = kill_story["summary"]
    train = Path(summary["stages"]["train"]["output"])
    assert train.name == after["partial"].name.removesuffix(".partial"), "not the same train folder"
    manifest = json.loads((train / "manifest.json").read_text())
    assert manifest["result"]["epochs_run"] == EPOCHS - k, "the second run did not resume"
    history = pd.read_csv(train / "history.csv")
    assert history["epoch"].tolist() == list(range(1, EPOCHS + 1))
    # epochs 1..k are the killed run's rows, as they were
    pd.testing.assert_frame_equal(history.iloc[:k].reset_index(drop=True),
                                  after["history"].iloc[:k].reset_index(drop=True))
    # the weights and optimizer state were restored: the first resumed epoch's loss continues from
    # where the killed run stopped instead of starting again from a fresh network's
    loss = history["loss"].tolist()
    assert abs(loss[k] - loss[k - 1]) < abs(loss[k] - loss[0]), loss
    numbers = [c for c in history.columns if not c.endswith("seconds")]
    pd.testing.assert_frame_equal(history[numbers], reference["history"][numbers], check_exact=True)
    assert summary["metrics"] == reference["summary"]["metrics"]


def test_sigkill_while_predict_writes_redoes_only_predict(kill_story):
    after = kill_story["after_second"]
    assert "Traceback" not in after["stderr"]
    assert {s: bool(v) for s, v in after["finished"].items()} == {
        "extract": True, "split": True, "datasets": True, "train": True, "evaluate": True, "predict": False}
    assert len(after["predict_partial"]) == 1 and len(after["predict_files"]) == 5
    assert not after["runs"]

    summary, work = kill_story["summary"], kill_story["work"]
    assert states(summary) == only("predict")
    out = summary["outputs"]
    assert len(list(Path(out["test_masks"]).glob("*.png"))) == TEST_FRAMES
    assert len(list(Path(out["test_overlays"]).glob("*.png"))) == TEST_FRAMES
    assert tifffile.imread(out["test_probabilities"]).shape == (TEST_FRAMES, 256, 256)
    leftovers = [p for s in STAGES for p in (work / s).iterdir() if "." in p.name]
    assert leftovers == [], "partial folders left behind"


# README "What to expect" (flows/cli.py EXIT_INTERRUPTED, EXIT_TERMINATED): 130 after Ctrl-C, 143 after
# SIGTERM or SIGHUP; each with one error line and no traceback.
EXIT_CODE = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 143}
ERROR_LINE = {signal.SIGINT: "error: interrupted", signal.SIGTERM: "error: stopped by SIGTERM",
              signal.SIGHUP: "error: stopped by SIGHUP"}


def _signal_when(pipeline, args, name, ready, what, signum: int = signal.SIGTERM, one_line: bool = True) -> None:
    """Start a run, send ``signum`` once ``ready()``; it must exit with EXIT_CODE[signum] and without
    a traceback (with ``one_line``: one ERROR_LINE[signum] line), its server gone within 60 s (an
    orphan stays for good; on a loaded machine the server has taken over 15 s to exit)."""
    proc = pipeline.start(args, name)
    wait_for(ready, proc, 300, what)
    proc.send_signal(signum)
    code = proc.wait(120)
    err = pipeline.output(proc)[1]
    assert code == EXIT_CODE[signum], err[-3000:]
    if one_line:
        [line] = error_lines(err)
        assert line.startswith(ERROR_LINE[signum]), line
    assert "Traceback" not in err
    left = wait_gone(pipeline.home, 60)
    assert left == {}, f"still running after {signal.Signals(signum).name}: {left}"


# The signal goes to the run's process alone (``kill -INT PID``); the process group's case (a real Ctrl-C)
# is in test_no_orphans.py and the kill matrix: the temporary server runs in a session of its own, so
# it no longer dies first (before: the run ended after 149 s with exit code 1 and "error: ConnectError:
# [Errno 111] Connection refused"). SIGINT in training: MindSpore's own SIGINT handler turned it into
# SIGTERM (143, "stopped by SIGTERM") until flows/sigint.py.
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_in_training_exits_with_its_code_and_leaves_no_server(signum, data, pipeline, tmp_path):
    work = tmp_path / "work"
    args = ["--data-dir", str(data), "--work-dir", str(work), *ARGS, "--epochs", "40"]
    _signal_when(pipeline, args, signum.name.lower(),
                 lambda: any(_history_rows(h) >= 1 for h in _partial_history(work)), "the first epoch", signum)
    assert not finished(work, "train") and len(list((work / "train").glob("*.partial"))) == 1


# Before the flow starts (flows/command.py _signals_exit: after the argument and input checks, while
# MindSpore is imported) a signal ends the process at once. run_with_fault.py pauses the run right
# after its input checks, so the signal lands in that window every time.
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_before_the_flow_starts_exits_with_its_code(signum, data, pipeline, tmp_path):
    work = tmp_path / "work"
    marker = tmp_path / "checked"
    args = ["--data-dir", str(data), "--work-dir", str(work), *ARGS]
    proc_env = {"FAULT": "pause-in-check", "PAUSE_MARKER": str(marker)}
    proc = pipeline.start(args, f"{signum.name.lower()}-before", wrapper=[str(HERE / "run_with_fault.py")],
                          env=proc_env)
    wait_for(marker.exists, proc, 120, "the input checks to pass")
    proc.send_signal(signum)
    code = proc.wait(60)
    err = pipeline.output(proc)[1]
    assert "Traceback" not in err, err[-3000:]
    assert code == EXIT_CODE[signum], err[-3000:]
    [line] = error_lines(err)
    # SIGTERM and SIGHUP say where they stopped it (flows/command.py _signals_exit)
    assert line.startswith(ERROR_LINE[signum]), line
    assert not (work / "runs").exists() and wait_gone(pipeline.home, 10) == {}


def test_sigterm_as_the_evaluate_stage_starts_leaves_no_server(data, pipeline, tmp_path):
    # between stages the main thread is in Prefect's task machinery and lazy imports, not in training
    work = tmp_path / "work"
    args = ["--data-dir", str(data), "--work-dir", str(work), *ARGS]
    _signal_when(pipeline, args, "term-evaluate",
                 lambda: (work / "evaluate").is_dir() and any((work / "evaluate").glob("*.partial")),
                 "the evaluate stage to start")
    assert finished(work, "train") and not finished(work, "evaluate")


def test_sigterm_while_the_server_starts_leaves_no_server(data, pipeline, tmp_path):
    work = tmp_path / "work"
    log = pipeline.logs / "term-early.err"
    args = ["--data-dir", str(data), "--work-dir", str(work), *ARGS]
    _signal_when(pipeline, args, "term-early", lambda: log.exists() and "Starting temporary server" in log.read_text(),
                 "the temporary server to start", one_line=False)


def test_disk_full_in_a_stage_is_one_line_without_traceback(data, pipeline, tmp_path):
    """ENOSPC inside a Prefect task: Prefect logs the failure (without its traceback unless
    --debug), main prints the original error as one line naming the stage folder, exit code 1."""
    work = tmp_path / "work"
    args = ["--data-dir", str(data), "--work-dir", str(work), *ARGS]
    proc = pipeline.start(args, "disk-full", wrapper=[str(HERE / "run_with_fault.py")],
                          env={"FAULT": "disk-full-in-extract"})
    assert proc.wait(300) == 1
    out, err = pipeline.output(proc)
    assert "Traceback" not in err, err
    [line] = error_lines(err)
    assert line.startswith(f"error: {work / 'extract'}/") and line.endswith(
        ".partial: No space left on device (while writing the extract stage)"), line
    assert out == "" and not finished(work, "extract") and not (work / "runs").exists()
