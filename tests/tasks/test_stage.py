"""The stage folder mechanism, without Prefect: keys, partial folders, manifests, locking."""
import json
import os
import threading
import time

import pytest

from tasks.stage import StagePolicy, _locked, file_digest, is_finished, outputs_exist, run_stage

POLICY = StagePolicy(stage="demo", code=("tasks/stage.py",), files=("source",))


def _inputs(tmp_path, **extra):
    return {"source": str(tmp_path / "in.txt"), "n": 1, "work_dir": str(tmp_path / "work"), **extra}


def _writer(calls):
    def build(folder):
        calls.append(folder)
        (folder / "out.txt").write_text("x")
        return {"out": "out.txt"}
    return build


def test_key_follows_file_content_not_path(tmp_path):
    (tmp_path / "in.txt").write_text("a")
    (tmp_path / "copy.txt").write_text("a")
    k1 = POLICY.content_key(_inputs(tmp_path))
    k2 = POLICY.content_key({**_inputs(tmp_path), "source": str(tmp_path / "copy.txt")})
    (tmp_path / "in.txt").write_text("b")
    k3 = POLICY.content_key(_inputs(tmp_path))
    assert k1 == k2 != k3


def test_key_follows_parameters_and_code_but_not_work_dir(tmp_path):
    (tmp_path / "in.txt").write_text("a")
    base = POLICY.content_key(_inputs(tmp_path))
    assert POLICY.content_key(_inputs(tmp_path, n=2)) != base
    assert POLICY.content_key({**_inputs(tmp_path), "work_dir": "/elsewhere", "refresh": True}) == base
    other_code = StagePolicy(stage="demo", code=("tasks/stage.py", "unet/model.py"), files=("source",))
    assert other_code.content_key(_inputs(tmp_path)) != base


def test_upstream_results_are_keyed_by_their_key_not_their_folder(tmp_path):
    policy = StagePolicy(stage="down", code=("tasks/stage.py",))
    a = {"stage": "up", "key": "abc", "output": "/one/place"}
    b = {"stage": "up", "key": "abc", "output": "/another/place"}
    c = {"stage": "up", "key": "abd", "output": "/one/place"}
    w = str(tmp_path)
    assert policy.content_key({"up": a, "work_dir": w}) == policy.content_key({"up": b, "work_dir": w})
    assert policy.content_key({"up": a, "work_dir": w}) != policy.content_key({"up": c, "work_dir": w})


def test_run_writes_manifest_and_reuses_a_finished_folder(tmp_path):
    (tmp_path / "in.txt").write_text("a")
    calls = []
    first = run_stage(POLICY, _writer(calls), _inputs(tmp_path))
    second = run_stage(POLICY, _writer(calls), _inputs(tmp_path))
    assert len(calls) == 1 and first == second
    manifest = json.loads((tmp_path / "work" / "demo" / first["key"] / "manifest.json").read_text())
    assert manifest["inputs"]["source"] == file_digest(tmp_path / "in.txt")
    assert manifest["result"] == {"out": "out.txt"} and "mindspore" in manifest["packages"]
    assert outputs_exist(first)


def test_refresh_recomputes_in_place(tmp_path):
    (tmp_path / "in.txt").write_text("a")
    calls = []
    first = run_stage(POLICY, _writer(calls), _inputs(tmp_path))
    again = run_stage(POLICY, _writer(calls), _inputs(tmp_path, refresh=True))
    assert len(calls) == 2 and again["output"] == first["output"] and is_finished(again["output"])
    assert sorted(os.listdir(tmp_path / "work" / "demo")) == [first["key"]]


def test_failed_build_leaves_no_finished_folder(tmp_path):
    (tmp_path / "in.txt").write_text("a")

    def broken(folder):
        (folder / "half.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        run_stage(POLICY, broken, _inputs(tmp_path))
    key = POLICY.content_key(_inputs(tmp_path))
    assert not (tmp_path / "work" / "demo" / key).exists()
    calls = []
    run_stage(POLICY, _writer(calls), _inputs(tmp_path))  # the next run starts the partial afresh
    assert len(calls) == 1
    assert not (tmp_path / "work" / "demo" / key / "half.txt").exists()


def test_concurrent_runs_compute_once(tmp_path):
    (tmp_path / "in.txt").write_text("a")
    calls = []

    def slow(folder):
        calls.append(folder)
        time.sleep(0.5)
        (folder / "out.txt").write_text("x")
        return {"out": "out.txt"}

    results = []
    threads = [threading.Thread(target=lambda: results.append(run_stage(POLICY, slow, _inputs(tmp_path))))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results[0] == results[1]


def test_shared_locks_coexist_and_keep_an_exclusive_one_waiting(tmp_path):
    """What segment-volume's output lock relies on: writers share it, the finish takes it alone."""
    lock = tmp_path / ".out.lock"
    entered = threading.Event()

    def exclusive():
        with _locked(lock):
            entered.set()

    with _locked(lock, shared=True), _locked(lock, shared=True):  # a second shared holder does not wait
        thread = threading.Thread(target=exclusive)
        thread.start()
        assert not entered.wait(0.5)
    assert entered.wait(10)
    thread.join()
