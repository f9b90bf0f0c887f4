"""Data-parallel training with msrun: 2 local ranks, smoke recipe, the real ISBI frames."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import mindspore as ms
import numpy as np
import pandas as pd
import pytest

from unet.distributed import (SINGLE, Cluster, ProcessGroup, check_data, job_pairs, last_error_line, launch,
                              params_digest, rank_failure, read_job, shard_steps, write_job)
from unet.infer import load_model, predict_frame
from unet.model import UNet
from unet.recipes import PRESETS
from unet.train import HISTORY_COLUMNS

slow = pytest.mark.slow
WORKERS = 2


@pytest.fixture(scope="module")
def trained(frames, tmp_path_factory):
    out = tmp_path_factory.mktemp("dp-train")
    recipe = PRESETS["smoke"]
    rows = []
    result = launch(recipe, frames["train"], frames["val"], out, Cluster(WORKERS), on_epoch=rows.append,
                    poll_seconds=0.5)
    return recipe, result, out, rows


def copy_run(src, dst, names=("last.ckpt", "last.json", "history.csv", "best.ckpt")):
    for name in names:
        shutil.copy(src / name, dst / name)


# --------------------------------------------------------------------------- real msrun runs


@slow
def test_two_ranks_write_the_single_process_layout_and_keep_every_log(trained):
    recipe, result, out, rows = trained
    assert (out / "best.ckpt").is_file() and (out / "last.ckpt").is_file()
    history = pd.read_csv(out / "history.csv")
    assert list(history.columns) == HISTORY_COLUMNS
    assert list(history["epoch"]) == list(range(1, recipe.epochs + 1))
    assert [r["epoch"] for r in rows] == list(range(1, recipe.epochs + 1))  # progress while it ran
    assert json.loads((out / "last.json").read_text())["epoch"] == recipe.epochs
    assert result.epochs_run == recipe.epochs
    assert result.best_epoch == int(history.loc[history["val_iou"].idxmax(), "epoch"])
    logs = out / "logs"
    for name in ("scheduler.log", "worker_0.log", "worker_1.log", "msrun.log", "job.json"):
        assert (logs / name).is_file(), name
    for rank in range(WORKERS):  # every rank trained every epoch (each logs its epochs)
        assert f"epoch {recipe.epochs}/{recipe.epochs}" in (logs / f"worker_{rank}.log").read_text()
    assert not list(logs.glob("rank_*.error"))


@slow
def test_loss_goes_down(trained):
    _, _, out, _ = trained
    loss = pd.read_csv(out / "history.csv")["loss"]
    assert loss.iloc[-1] < loss.iloc[0]


@slow
def test_ranks_end_with_identical_weights_which_rank_0_saved(trained):
    recipe, result, out, _ = trained
    reports = [json.loads((out / "logs" / f"rank_{r}.json").read_text()) for r in range(WORKERS)]
    assert [r["rank"] for r in reports] == list(range(WORKERS))
    assert {r["weights_sha256"] for r in reports} == {result.weights_sha256}
    net = UNet(recipe.in_channels, recipe.base_channels)
    ms.load_param_into_net(net, ms.load_checkpoint(str(out / "last.ckpt")))
    assert params_digest(net.get_parameters()) == result.weights_sha256


@slow
def test_checkpoint_loads_and_scores_what_the_history_says(trained, frames):
    from unet.data import SegmentationSource, resize_transforms
    from unet.train import evaluate_case_metrics

    recipe, result, out, _ = trained
    net = load_model(result.best_checkpoint, recipe)
    val = SegmentationSource(frames["val"], resize_transforms(recipe.image_size), recipe.in_channels)
    single = evaluate_case_metrics(net, val, recipe.val_batch_size)  # one process, every image
    best = pd.read_csv(out / "history.csv").set_index("epoch").loc[result.best_epoch]
    for metric in ("acc", "iou", "dice"):  # the ranks scored half of the images each
        assert single[metric] == pytest.approx(best[f"val_{metric}"], abs=1e-3)
    frame = cv2.imread(str(frames["val"][0][0]), cv2.IMREAD_GRAYSCALE)
    prob = predict_frame(net, frame, recipe)
    assert prob.shape == frame.shape and 0.0 <= prob.min() and prob.max() <= 1.0


@slow
def test_resume_with_two_workers_continues_after_the_last_epoch(trained, frames, tmp_path):
    recipe, _, out, _ = trained
    copy_run(out, tmp_path)
    longer = recipe.replace(epochs=recipe.epochs + 1)
    result = launch(longer, frames["train"], frames["val"], tmp_path, Cluster(WORKERS), resume=True)
    assert result.epochs_run == 1
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history["epoch"]) == list(range(1, longer.epochs + 1))
    pd.testing.assert_frame_equal(history.iloc[:recipe.epochs], pd.read_csv(out / "history.csv"))
    assert "resuming from" in (tmp_path / "logs" / "worker_0.log").read_text()
    digests = {json.loads((tmp_path / "logs" / f"rank_{r}.json").read_text())["weights_sha256"]
               for r in range(WORKERS)}
    assert digests == {result.weights_sha256}  # rank 1 got rank 0's checkpoint


@slow
def test_a_failing_rank_fails_the_launch_with_its_error(trained, frames, tmp_path):
    recipe, _, out, _ = trained
    copy_run(out, tmp_path)
    (tmp_path / "last.ckpt").write_bytes(b"not a checkpoint")  # only rank 0 reads it
    with pytest.raises(RuntimeError, match=r"failed on rank 0: ValueError: .*last\.ckpt"):
        launch(recipe.replace(epochs=recipe.epochs + 1), frames["train"], frames["val"], tmp_path,
               Cluster(WORKERS), resume=True)
    assert (tmp_path / "logs" / "rank_0.error").is_file()


@slow
def test_a_rank_killed_mid_training_fails_the_launch_naming_it(frames, tmp_path):
    pid_file = tmp_path / "logs" / "rank_1.pid"

    def kill_rank_1(row):  # like the OOM killer: SIGKILL, no Python error
        if row["epoch"] == 1:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)

    with pytest.raises(RuntimeError, match=r"failed on rank 1: killed by SIGKILL .*worker_1\.log"):
        launch(PRESETS["smoke"].replace(epochs=30), frames["train"], frames["val"], tmp_path, Cluster(WORKERS),
               on_epoch=kill_rank_1, poll_seconds=0.5)
    assert json.loads((tmp_path / "last.json").read_text())["epoch"] < 30


# --------------------------------------------------------------------------- without msrun


def test_rank_failure_names_the_first_rank_that_raised(tmp_path):
    (tmp_path / "worker_0.log").write_text("epoch 1\nRuntimeError: peer rank left\n")
    (tmp_path / "worker_1.log").write_text("Traceback (most recent call last):\nValueError: bad frame\n"
                                           "----\n- C++ Call Stack:\n[INFO] shutting down\n")
    assert last_error_line(tmp_path / "worker_1.log") == "ValueError: bad frame"
    assert rank_failure(tmp_path)[:2] == (0, "RuntimeError: peer rank left")  # no .error files: logs in order
    (tmp_path / "rank_1.error").write_text("ValueError: bad frame\n")
    assert rank_failure(tmp_path) == (1, "ValueError: bad frame", tmp_path / "worker_1.log")


def test_rank_failure_is_none_without_errors(tmp_path):
    (tmp_path / "worker_0.log").write_text("epoch 1/5 loss 0.8\n")
    assert rank_failure(tmp_path) is None


def test_cluster_rejects_bad_shapes():
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        Cluster(0)
    with pytest.raises(ValueError, match=r"workers \(3\) must be a positive multiple of nodes \(2\)"):
        Cluster(3, nodes=2, master_port=29500)
    with pytest.raises(ValueError, match="fixed master_port"):
        Cluster(4, nodes=2)
    assert Cluster(4, nodes=2, master_port=29500).local_workers == 2


def test_ranks_split_each_epoch_rounding_up():
    assert [shard_steps(10, n) for n in (1, 2, 3)] == [10, 5, 4]
    assert shard_steps(5, 2) == 3  # the seed preset: 20 frames, batch 4, 2 ranks


def test_single_process_group_is_the_identity():
    values = np.array([[0.1, -2.5], [np.pi, 1e-300]])
    gathered = SINGLE.gather(values)
    assert gathered.shape == (1, 2, 2) and gathered[0].tobytes() == values.tobytes()
    assert SINGLE.mean(0.25) == 0.25
    SINGLE.check_same("ab" * 32, "weights")


class _ThreadRanks(ProcessGroup):
    """Ranks as threads of this process: ``sum`` adds every rank's array (what MindSpore's
    all-reduce does across msrun's processes); every other collective is ProcessGroup's own code."""

    def __init__(self, rank: int, size: int, shared: dict) -> None:
        self.rank, self.size, self.shared = rank, size, shared

    def sum(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        self.shared["parts"][self.rank] = x
        self.shared["barrier"].wait()
        total = np.sum(list(self.shared["parts"].values()), axis=0, dtype=np.float32)
        self.shared["barrier"].wait()  # every rank has read the parts before the next call writes them
        return total


def _check_same_on_ranks(digests: list[str]) -> list[BaseException | None]:
    """Each rank r calls check_same(digests[r]) in a thread; what each raised (None: nothing)."""
    shared = {"parts": {}, "barrier": threading.Barrier(len(digests), timeout=30)}
    raised: list[BaseException | None] = [None] * len(digests)

    def rank(r: int) -> None:
        try:
            _ThreadRanks(r, len(digests), shared).check_same(digests[r], "weights after training")
        except BaseException as exc:  # noqa: BLE001 (reported to the test)
            raised[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(digests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return raised


def test_ranks_with_differing_weights_fail_the_check_on_every_rank():
    # train() calls check_same on the ranks' params_digest at start and end: a rank whose weights
    # differ must stop every rank, naming it
    net = UNet(1, 8)
    same = params_digest(net.get_parameters())
    params = list(net.get_parameters())
    params[0].set_data(ms.Tensor(params[0].asnumpy() + 1e-3))  # one rank's weights moved a little
    other = params_digest(params)
    assert other != same
    assert _check_same_on_ranks([same, same, same]) == [None, None, None]
    raised = _check_same_on_ranks([same, same, other])
    for exc in raised:
        assert isinstance(exc, RuntimeError), raised
        assert str(exc).startswith("weights after training differ between rank 0 and rank(s) [2]"), exc
    # any digests that differ in what check_same compares (the first 128 bits), whatever their bytes
    raised = _check_same_on_ranks(["00" * 32, "ff" * 16 + "00" * 16])
    assert [type(e) for e in raised] == [RuntimeError, RuntimeError] and "rank(s) [1]" in str(raised[0])


def test_workers_are_part_of_the_train_stage_key():
    from tasks.train import POLICY

    inputs = {"datasets": {"stage": "datasets", "key": "k"}, "recipe": PRESETS["smoke"].to_dict(),
              "work_dir": "/w", "refresh": False}
    keys = {POLICY.content_key({**inputs, "workers": n}) for n in (1, 2)}
    assert len(keys) == 2


def test_rank_killed_by_a_signal_is_named_from_msrun_log(tmp_path):
    (tmp_path / "worker_0.log").write_text("epoch 1/5 loss 0.8\n")
    (tmp_path / "worker_1.log").write_text("epoch 1/5 loss 0.8\n")
    (tmp_path / "rank_0.pid").write_text("4242")
    (tmp_path / "rank_1.pid").write_text("4343")
    (tmp_path / "msrun.log").write_text(
        "[ERROR] ME(1:1,MainProcess):... Worker process 4343 exit with exception. Error code: -9.\n")
    rank, line, log = rank_failure(tmp_path)
    assert (rank, log) == (1, tmp_path / "worker_1.log")
    assert line.startswith("killed by SIGKILL (exit code -9)") and "out of memory" in line


def test_rank_lost_without_a_trace_is_named_from_the_scheduler_log(tmp_path):
    # node 1 died (another host): node 0 sees its own rank fail in the all-reduce and the scheduler
    # report the silent rank; the silent one is the cause
    (tmp_path / "worker_0.log").write_text("epoch 1/3 loss 0.8\nRuntimeError: Launch kernel failed, name:Default/AllReduce-op0\n")
    (tmp_path / "rank_0.error").write_text("RuntimeError: Launch kernel failed, name:Default/AllReduce-op0\n")
    (tmp_path / "scheduler.log").write_text(
        "[ERROR] DISTRIBUTED(1,7f,python):2026 [meta_server_node.cc:548] UpdateTopoState] The node: 1 is timed out. "
        "It may exit with exception, please check this node's log.\n")
    rank, line, log = rank_failure(tmp_path)
    assert (rank, log) == (1, tmp_path / "scheduler.log")
    assert line.startswith("lost: no heartbeat from it for 30 s")
    (tmp_path / "rank_1.error").write_text("ValueError: bad frame\n")  # it did say why, here: that is the cause
    assert rank_failure(tmp_path)[:2] == (0, "RuntimeError: Launch kernel failed, name:Default/AllReduce-op0")


def test_job_lists_frames_relative_to_their_folder_and_another_host_reads_its_copy(tmp_path):
    split = tmp_path / "node0" / "split"
    pairs = {}
    for subset, n in (("train", 2), ("val", 1)):
        (split / subset).mkdir(parents=True)
        pairs[subset] = [(split / subset / f"{i}.png", split / subset / f"{i}_mask.png") for i in range(n)]
        for pair in pairs[subset]:
            for f in pair:
                f.write_bytes(b"png")
    job_path = write_job(PRESETS["smoke"], pairs["train"], pairs["val"], tmp_path / "node0" / "train",
                         Cluster(2, nodes=2, master_port=29500), resume=True)
    job = read_job(job_path)
    assert job["data_dir"] == str(split.resolve()) and job["train"][1] == ["train/1.png", "train/1_mask.png"]
    assert job_pairs(job, "val") == [(split.resolve() / "val/0.png", split.resolve() / "val/0_mask.png")]
    check_data(job)
    copy = tmp_path / "node1" / "split"
    shutil.copytree(split, copy)
    assert job_pairs(job, "train", copy)[0] == (copy / "train/0.png", copy / "train/0_mask.png")
    check_data(job, copy)
    (copy / "val" / "0_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"node1/split/val/0_mask\.png: a val frame of the job is missing"):
        check_data(job, copy)


def test_joining_refuses_the_launching_host_and_missing_frames_with_one_line(tmp_path, capsys):
    from unet.distributed import main

    split = tmp_path / "split"
    split.mkdir()
    (split / "a.png").write_bytes(b"png")
    job_path = write_job(PRESETS["smoke"], [(split / "a.png", split / "a.png")], [], tmp_path / "train",
                         Cluster(2, nodes=2, master_port=29500), resume=True)
    assert main([str(job_path), "--node-rank", "0"]) == 1
    assert capsys.readouterr().err == "error: --node-rank must be in 1..1 (node 0 is the launching host), got 0\n"
    assert main([str(job_path), "--node-rank", "1", "--data-dir", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'nowhere' / 'a.png'}: a train frame") and err.count("\n") == 1
    assert main([str(tmp_path / "no.json"), "--node-rank", "1"]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'no.json'}: job file not found\n"


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_process_started_with_die_with_parent_dies_with_its_parent():
    # the parent starts a child the way run_msrun starts msrun, prints its pid, then waits; SIGKILL
    # of the parent alone (not its group) must end the child too
    parent = subprocess.Popen([sys.executable, "-c", (
        "import functools, os, subprocess, sys, time\n"
        "from unet.distributed import _libc, die_with_parent\n"
        "_libc()\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
        "                         preexec_fn=functools.partial(die_with_parent, os.getpid()))\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert running(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(child), "the child outlived its SIGKILLed parent"


def test_train_does_not_import_the_launcher():
    # unet.train needs the in-rank half (unet.parallel), unet.distributed launches unet.train's
    # ranks: no import cycle, and the launcher's code is not part of what evaluation imports
    from tasks.stage import code_closure

    assert "unet/distributed.py" not in code_closure(("unet/train.py",))
    assert "unet/parallel.py" in code_closure(("unet/train.py",))
    assert "unet/train.py" not in code_closure(("unet/parallel.py",))
