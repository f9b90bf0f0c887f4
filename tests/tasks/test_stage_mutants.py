"""tasks.stage behaviour the other fast tests left unchecked (found by mutation testing,
benchmarks/mutation.py): the import closure on a small project of its own, what the code digest,
the keys and the manifest are made of, and call_stage's rerun of a cache hit whose folder is gone."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import time
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import pytest

import tasks.stage as stage
from tasks.stage import (NOT_KEYED, PACKAGES, RESULT_PACKAGES, StagePolicy, call_stage, code_closure,
                         code_version, current_inputs, file_digest, is_finished, outputs_exist, run_stage)

REPO = Path(__file__).resolve().parents[2]


def _project(root: Path) -> Path:
    """A small project: every kind of import statement the closure must follow, and some it must not."""
    files = {
        "unet/__init__.py": "",
        "unet/a.py": "import numpy\nimport unet.b\n",
        "unet/b.py": "def f():\n    from unet.sub import c  # lazy: imported when f runs\n",
        "unet/sub/__init__.py": "",
        "unet/sub/c.py": "from collections import OrderedDict\n",
        "unet/d.py": "X = 1\n",
        "unet/unused.py": "import unet.d\n",
        "tasks/__init__.py": "",
        "tasks/t.py": "import os, unet.a\nfrom tasks import helper\n",
        "tasks/helper.py": "from unet.d import X as Y\n",
        "flows/__init__.py": "",
        "flows/f.py": "import flows\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_closure_follows_every_import_form_transitively(tmp_path):
    root = _project(tmp_path)
    # tasks/t.py -> unet.a (import) -> unet.b -> unet.sub.c (lazy, from-import of a submodule);
    # tasks.helper (from-import of a module) -> unet.d (from-import of a name); the packages'
    # __init__.py on the way; numpy, os and collections are no project modules; unet/unused.py and
    # flows/ are imported by nothing here
    assert code_closure(("tasks/t.py",), root) == (
        "tasks/__init__.py", "tasks/helper.py", "tasks/t.py", "unet/__init__.py", "unet/a.py", "unet/b.py",
        "unet/d.py", "unet/sub/__init__.py", "unet/sub/c.py")
    assert code_closure(("unet/sub/c.py",), root) == ("unet/sub/c.py",)
    assert code_closure(("flows/f.py",), root) == ("flows/__init__.py", "flows/f.py")


def test_the_closure_of_several_modules_is_the_union_of_theirs(tmp_path):
    root = _project(tmp_path)
    both = code_closure(("unet/unused.py", "unet/sub/c.py"), root)
    assert set(both) == set(code_closure(("unet/unused.py",), root)) | {"unet/sub/c.py"}
    assert both == tuple(sorted(both))


def test_the_code_version_covers_each_module_by_name_and_content_and_not_their_order(tmp_path):
    root = _project(tmp_path)
    modules = ("unet/a.py", "unet/d.py")
    digest = code_version(modules, root)
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert code_version(tuple(reversed(modules)), root) == digest
    assert code_version(("unet/a.py",), root) != digest
    (root / "unet" / "d.py").write_text("X = 2\n")
    assert code_version(modules, root) != digest
    # the same content under another name is another program (its imports resolve elsewhere)
    (root / "unet" / "e.py").write_text((root / "unet" / "d.py").read_text())
    assert code_version(("unet/a.py", "unet/e.py"), root) != code_version(modules, root)


def test_the_code_version_covers_each_result_package_version(tmp_path, monkeypatch):
    root = _project(tmp_path)
    before = code_version(("unet/a.py",), root)
    real = stage.version
    for package in RESULT_PACKAGES:
        monkeypatch.setattr(stage, "version", lambda p, changed=package: "0.0-test" if p == changed else real(p))
        assert code_version(("unet/a.py",), root) != before, package
    monkeypatch.setattr(stage, "version", lambda p: "0.0-test" if p == "prefect" else real(p))
    assert code_version(("unet/a.py",), root) == before  # prefect only runs the stages


def test_a_policy_keys_the_closure_of_its_task_module_and_of_the_programs_it_launches():
    split = StagePolicy(stage="split", module="tasks/split.py")
    assert {"tasks/split.py", "tasks/stage.py", "unet/split.py", "unet/__init__.py"} <= set(split.code)
    assert split.code == code_closure(("tasks/split.py",)) and split.code_digest == code_version(split.code)
    launched = StagePolicy(stage="split", module="tasks/split.py", launched=("unet/msrun_worker.py",))
    assert set(launched.code) == set(split.code) | set(code_closure(("unet/msrun_worker.py",)))
    assert launched.code_digest != split.code_digest
    given = StagePolicy(stage="demo", code=("tasks/stage.py",))
    assert given.code == ("tasks/stage.py",)


def test_file_digest_is_the_sha256_of_the_whole_content(tmp_path):
    big = tmp_path / "big.bin"
    content = bytes(range(256)) * (3 * 4096 + 1)  # 3 MiB and a bit: more than one read block
    big.write_bytes(content)
    assert file_digest(big) == hashlib.sha256(content).hexdigest()
    assert file_digest(str(big)) == file_digest(big)
    with pytest.raises(FileNotFoundError, match=r"missing\.bin: file not found"):
        file_digest(tmp_path / "missing.bin")
    with pytest.raises(FileNotFoundError, match="file not found"):
        file_digest(tmp_path)  # a folder is no file


def test_the_key_names_the_stage_and_takes_paths_as_their_text(tmp_path):
    inputs = {"n": 1, "where": str(tmp_path), "work_dir": str(tmp_path)}
    a, b = StagePolicy(stage="a", code=("tasks/stage.py",)), StagePolicy(stage="b", code=("tasks/stage.py",))
    assert a.content_key(inputs) != b.content_key(inputs)
    assert a.content_key({**inputs, "where": tmp_path}) == a.content_key(inputs)
    assert a.content_key(dict(reversed(list(inputs.items())))) == a.content_key(inputs)


def test_a_parameter_dict_is_keyed_by_its_content_unless_it_is_an_upstream_result(tmp_path):
    policy = StagePolicy(stage="down", code=("tasks/stage.py",))
    w = str(tmp_path)
    # only a dict with both "stage" and "key" is an upstream result (keyed by those two alone)
    one = policy.content_key({"p": {"stage": "up", "lr": 0.1}, "work_dir": w})
    two = policy.content_key({"p": {"stage": "up", "lr": 0.2}, "work_dir": w})
    assert one != two
    assert (policy.content_key({"p": {"key": "k", "lr": 0.1}, "work_dir": w})
            != policy.content_key({"p": {"key": "k", "lr": 0.2}, "work_dir": w}))


def test_prefect_cache_key_is_the_content_key_per_work_directory(tmp_path):
    policy = StagePolicy(stage="demo", code=("tasks/stage.py",))
    (tmp_path / "w").mkdir()
    inputs = {"n": 1, "work_dir": str(tmp_path / "w")}
    key = policy.compute_key(None, inputs, {})
    name, content, where = key.split("-")
    assert name == "demo" and content == policy.content_key(inputs) and len(where) == 8
    # the same folder spelt another way shares results; another folder does not
    assert policy.compute_key(None, {**inputs, "work_dir": str(tmp_path / "w" / ".." / "w")}, {}) == key
    other = policy.compute_key(None, {**inputs, "work_dir": str(tmp_path / "v")}, {})
    assert other != key and other.rsplit("-", 1)[0] == key.rsplit("-", 1)[0]


def test_the_manifest_says_what_produced_the_folder(tmp_path):
    policy = StagePolicy(stage="demo", code=("tasks/stage.py",), files=("source",))
    (tmp_path / "in.txt").write_text("a")
    inputs = {"source": str(tmp_path / "in.txt"), "n": 3, "work_dir": str(tmp_path / "work"), "refresh": False}

    def build(folder):
        time.sleep(0.05)
        (folder / "out.txt").write_text("x")
        return {"out": "out.txt"}

    result = run_stage(policy, build, inputs)
    manifest = json.loads((Path(result["output"]) / "manifest.json").read_text())
    assert manifest["stage"] == "demo" and manifest["key"] == result["key"] == policy.content_key(inputs)
    assert manifest["code_version"] == policy.code_digest and manifest["code"] == ["tasks/stage.py"]
    assert manifest["inputs"] == {"source": file_digest(tmp_path / "in.txt"), "n": 3}  # not NOT_KEYED
    assert set(NOT_KEYED) == {"work_dir", "refresh"}
    assert manifest["packages"] == {p: version(p) for p in PACKAGES}
    assert manifest["python"] == platform.python_version() and manifest["host"] == platform.node()
    assert 0.05 <= manifest["seconds"] < 60
    created = datetime.strptime(manifest["created"], "%Y-%m-%dT%H:%M:%S%z")
    assert abs(time.time() - created.timestamp()) < 600
    assert manifest["result"] == {"out": "out.txt"}
    assert result == {"stage": "demo", "key": manifest["key"], "output": str(tmp_path / "work" / "demo" / result["key"]),
                      "out": "out.txt"}


def test_run_stage_outside_a_task_needs_its_inputs():
    with pytest.raises(RuntimeError, match=r"^current_inputs\(\) must be called inside a Prefect task run$"):
        current_inputs()
    with pytest.raises(RuntimeError, match="inside a Prefect task run"):
        run_stage(StagePolicy(stage="demo", code=("tasks/stage.py",)), lambda folder: {})


def test_outputs_exist_only_for_a_result_naming_a_finished_folder(tmp_path):
    assert not outputs_exist(None) and not outputs_exist({}) and not outputs_exist("x")
    assert not outputs_exist({"output": str(tmp_path / "gone")})
    (tmp_path / "half").mkdir()
    assert not outputs_exist({"output": str(tmp_path / "half")})
    (tmp_path / "half" / "manifest.json").write_text("{}")
    assert outputs_exist({"output": str(tmp_path / "half")})


class _State:
    def __init__(self, name: str, result: dict):
        self.name, self._result = name, result

    def result(self) -> dict:
        return self._result


class _Task:
    """Stands in for a Prefect task: records each call and whether it forced a refresh of the cache;
    answers Cached with ``cached`` while the cache is not refreshed, else Completed with ``fresh``."""

    def __init__(self, cached: dict, fresh: dict, calls: list, refresh_cache: bool = False):
        self.cached, self.fresh, self.calls, self.refresh_cache = cached, fresh, calls, refresh_cache

    def with_options(self, refresh_cache: bool = False) -> "_Task":
        return _Task(self.cached, self.fresh, self.calls, refresh_cache)

    def __call__(self, return_state: bool = False, **kwargs) -> _State:
        assert return_state
        self.calls.append((self.refresh_cache, kwargs))
        self.verified = stage._VERIFY.get()  # what run_stage would check the reused folder with
        return _State("Completed", self.fresh) if self.refresh_cache else _State("Cached", self.cached)


def test_call_stage_reruns_a_cache_hit_whose_folder_is_gone_and_only_then(tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    (done / "manifest.json").write_text("{}")
    fresh = {"output": str(done), "n": 2}

    calls = []
    name, seconds, result = call_stage(_Task({"output": str(done), "n": 1}, fresh, calls), x=1)
    assert (name, result["n"]) == ("Cached", 1) and 0 <= seconds < 60
    assert calls == [(False, {"refresh": False, "x": 1})]

    calls = []
    name, _, result = call_stage(_Task({"output": str(tmp_path / "deleted")}, fresh, calls), x=1)
    assert (name, result) == ("Completed", fresh)
    assert calls == [(False, {"refresh": False, "x": 1}), (True, {"refresh": False, "x": 1})]

    calls = []
    name, _, result = call_stage(_Task({"output": str(done)}, fresh, calls), refresh=True, x=1)
    assert (name, result) == ("Completed", fresh) and calls == [(True, {"refresh": True, "x": 1})]


def test_call_stage_with_verify_checks_hashes_and_reruns_a_cache_hit_edited_in_place(tmp_path):
    policy = StagePolicy(stage="demo", code=("tasks/stage.py",))

    def build(folder):
        (folder / "out.txt").write_text("good")
        return {"out": "out.txt"}

    done = run_stage(policy, build, {"n": 1, "work_dir": str(tmp_path)})
    (Path(done["output"]) / "out.txt").write_text("evil")  # same size: only its sha256 tells
    fresh = {"output": done["output"], "n": 2}

    calls = []
    task = _Task(done, fresh, calls)
    name, _, result = call_stage(task, x=1)  # sizes only: reused
    assert (name, result) == ("Cached", done) and len(calls) == 1 and task.verified is False

    calls = []
    task = _Task(done, fresh, calls)
    name, _, result = call_stage(task, verify=True, x=1)
    assert (name, result) == ("Completed", fresh) and [refresh for refresh, _ in calls] == [False, True]
    assert task.verified is True
    assert stage._VERIFY.get() is False  # verifying() ends with the call


def test_inside_a_task_run_stage_keys_the_tasks_parameters(tmp_path, monkeypatch):
    # the running task's context stands in for Prefect's (a real task run needs a Prefect server:
    # the flow tests run those); current_inputs hands out a copy of its parameters
    import prefect.context

    parameters = {"n": 4, "work_dir": str(tmp_path)}

    class Context:
        @staticmethod
        def get():
            return type("TaskRun", (), {"parameters": parameters})()

    monkeypatch.setattr(prefect.context, "TaskRunContext", Context)
    got = current_inputs()
    assert got == parameters and got is not parameters
    policy = StagePolicy(stage="demo", code=("tasks/stage.py",))
    result = run_stage(policy, lambda folder: {})
    assert result["key"] == policy.content_key(parameters) and Path(result["output"]).parent.parent == tmp_path


def test_a_dict_parameter_keys_by_content_whatever_its_key_order(tmp_path):
    # e.g. a recipe's settings given as a dict: the same settings written in another order are the
    # same stage
    policy = StagePolicy(stage="demo", code=("tasks/stage.py",))
    w = str(tmp_path)
    assert (policy.content_key({"recipe": {"lr": 0.1, "epochs": 3}, "work_dir": w})
            == policy.content_key({"recipe": {"epochs": 3, "lr": 0.1}, "work_dir": w}))


def test_a_path_parameter_is_recorded_in_the_manifest_as_its_text(tmp_path):
    policy = StagePolicy(stage="demo", code=("tasks/stage.py",))
    inputs = {"model": tmp_path / "model.ckpt", "work_dir": str(tmp_path / "work")}
    result = run_stage(policy, lambda folder: {"model": tmp_path / "model.ckpt"}, inputs)
    manifest = json.loads((Path(result["output"]) / "manifest.json").read_text())
    assert manifest["inputs"] == {"model": str(tmp_path / "model.ckpt")}
    assert manifest["result"] == {"model": str(tmp_path / "model.ckpt")}
    assert result["key"] == policy.content_key({**inputs, "model": str(tmp_path / "model.ckpt")})


def test_the_manifest_records_the_build_time_to_the_millisecond(tmp_path, monkeypatch):
    # run_stage times the build alone with perf_counter: here a clock that says 1.23456 s
    clock = iter([100.0, 101.23456])
    monkeypatch.setattr(stage, "time", SimpleNamespace(strftime=time.strftime, perf_counter=lambda: next(clock)))
    result = run_stage(StagePolicy(stage="demo", code=("tasks/stage.py",)), lambda folder: {},
                       {"work_dir": str(tmp_path)})
    assert json.loads((Path(result["output"]) / "manifest.json").read_text())["seconds"] == 1.235


def test_a_build_holds_the_stages_lock_in_the_work_dirs_lock_folder(tmp_path):
    # docs/robustness.md: a stage is computed under an exclusive flock on
    # <work>/.locks/<stage>-<key>.lock, which a second run (or an operator) can find there
    policy = StagePolicy(stage="demo", code=("tasks/stage.py",))
    inputs = {"n": 1, "work_dir": str(tmp_path)}
    lock = tmp_path / ".locks" / f"demo-{policy.content_key(inputs)}.lock"
    held = []

    def build(folder):
        with lock.open("w") as f:  # another open file: flock conflicts with run_stage's lock
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
            except BlockingIOError:
                held.append(True)
        return {}

    run_stage(policy, build, inputs)
    assert held == [True]
    with lock.open("w") as f:  # released at the end
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_damaged_folder_is_logged_with_what_happens_instead(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="tasks.stage")
    policy = StagePolicy(stage="demo", code=("tasks/stage.py",))
    inputs = {"n": 1, "work_dir": str(tmp_path)}

    def build(folder):
        (folder / "out.txt").write_text("x")
        return {}

    done = Path(run_stage(policy, build, inputs)["output"])
    (done / "out.txt").write_text("longer")
    run_stage(policy, build, inputs)
    (done / "out.txt").unlink()
    assert not outputs_exist({"output": str(done)})
    assert [r.getMessage() for r in caplog.records] == [
        f"{done}: damaged stage folder (out.txt: 6 bytes, expected 1); computing the stage again",
        f"{done}: damaged stage folder (out.txt: missing); not used"]


def _undeletable(monkeypatch, name: str) -> None:
    """Files called ``name`` cannot be deleted (as a file held busy on a network file system)."""
    real = os.unlink

    def unlink(path, *args, **kwargs):
        if os.path.basename(path) == name:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)


def test_a_folder_that_cannot_be_removed_entirely_does_not_fail_the_stage(tmp_path, monkeypatch):
    # what a stage removes is its own leftovers: a file that will not go is left behind, never an
    # error that loses the stage's result (or hides the build's own error)
    policy = StagePolicy(stage="demo", code=("tasks/stage.py",))
    inputs = {"n": 1, "work_dir": str(tmp_path)}

    def build(folder):
        (folder / "stuck.txt").write_text("x")
        return {"n": 1}

    final = Path(run_stage(policy, build, inputs)["output"])
    _undeletable(monkeypatch, "stuck.txt")
    # a refresh moves the finished folder aside and removes it
    assert run_stage(policy, build, {**inputs, "refresh": True})["n"] == 1
    assert is_finished(final) and [p.name for p in final.parent.glob("*.old-*")] != []
    # the next run removes such stale folders first
    assert run_stage(policy, build, inputs)["n"] == 1

    def failing(folder):
        (folder / "stuck.txt").write_text("x")
        raise ValueError("the build's own error")

    with pytest.raises(ValueError, match="the build's own error"):
        run_stage(policy, failing, {"n": 2, "work_dir": str(tmp_path)})


def test_only_an_oserror_without_a_file_name_is_reworded(tmp_path):
    # an error naming its file says where it happened already; any other error passes unchanged
    policy = StagePolicy(stage="demo", code=("tasks/stage.py",))

    def missing(folder):
        open(folder / "gone" / "x.txt")

    with pytest.raises(FileNotFoundError) as err:
        run_stage(policy, missing, {"n": 1, "work_dir": str(tmp_path)})
    assert err.value.filename.endswith("gone/x.txt") and "while writing" not in str(err.value)

    def no_errno(folder):
        raise OSError("disk said no")

    with pytest.raises(OSError) as err:
        run_stage(policy, no_errno, {"n": 2, "work_dir": str(tmp_path)})
    assert str(err.value) == "disk said no" and err.value.filename is None

    def bad_value(folder):
        raise ValueError("not a stage error")

    with pytest.raises(ValueError, match="^not a stage error$"):
        run_stage(policy, bad_value, {"n": 3, "work_dir": str(tmp_path)})


def test_a_rewording_keeps_the_errors_text_without_its_number(tmp_path):
    policy = StagePolicy(stage="demo", code=("tasks/stage.py",))

    def full(folder):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as err:
        run_stage(policy, full, {"n": 1, "work_dir": str(tmp_path)})
    assert err.value.strerror == "No space left on device (while writing the demo stage)"

    def bare(folder):
        raise OSError(errno.EIO, None)  # an errno without its text

    with pytest.raises(OSError) as err:
        run_stage(policy, bare, {"n": 2, "work_dir": str(tmp_path)})
    assert err.value.errno == errno.EIO and err.value.strerror.endswith("(while writing the demo stage)")
    assert not err.value.strerror.startswith("None")


def test_a_module_that_does_not_parse_is_named_in_the_error_and_keys_are_16_hex_digits(tmp_path):
    root = _project(tmp_path)
    (root / "unet" / "d.py").write_text("X = (\n")
    with pytest.raises(SyntaxError) as err:
        code_closure(("tasks/t.py",), root)
    assert err.value.filename == str(root / "unet" / "d.py")
    key = StagePolicy(stage="demo", code=("tasks/stage.py",)).content_key({"n": 1})
    assert len(key) == 16 and int(key, 16) >= 0  # the stage folder's name, <work_dir>/<stage>/<key>
