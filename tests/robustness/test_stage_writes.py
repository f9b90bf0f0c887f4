"""tasks.stage under faults, without Prefect: a full disk in a build or in the manifest, a killed
refresh, a kill while a stage holds its lock. Nothing half-written is ever taken as finished."""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

import tasks.stage as stage
from tasks.stage import StagePolicy, is_finished, run_stage

POLICY = StagePolicy(stage="demo", code=("tasks/stage.py",))


def _inputs(tmp_path: Path, **extra) -> dict:
    return {"n": 1, "work_dir": str(tmp_path / "work"), **extra}


def _folders(tmp_path: Path) -> list[str]:
    root = tmp_path / "work" / "demo"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def _disk_full_after(n: int):
    def build(folder: Path) -> dict:
        for i in range(n):
            (folder / f"{i}.txt").write_text("x")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return build


def _good(calls: list):
    def build(folder: Path) -> dict:
        calls.append(folder)
        (folder / "out.txt").write_text("done")
        return {"out": "out.txt"}
    return build


def test_disk_full_in_a_build_names_the_stage_folder_and_keeps_nothing(tmp_path):
    key = POLICY.content_key(_inputs(tmp_path))
    with pytest.raises(OSError) as err:
        run_stage(POLICY, _disk_full_after(3), _inputs(tmp_path))
    assert err.value.errno == errno.ENOSPC
    assert err.value.filename == str(tmp_path / "work" / "demo" / f"{key}.partial")
    assert "No space left on device (while writing the demo stage)" in str(err.value)
    assert _folders(tmp_path) == []  # the partial folder is removed: its space is free again
    calls: list = []
    result = run_stage(POLICY, _good(calls), _inputs(tmp_path))
    assert len(calls) == 1 and is_finished(result["output"]) and _folders(tmp_path) == [key]


def test_disk_full_in_a_resumable_build_keeps_the_partial_for_the_next_run(tmp_path):
    key = POLICY.content_key(_inputs(tmp_path))
    with pytest.raises(OSError):
        run_stage(POLICY, _disk_full_after(2), _inputs(tmp_path), resumable=True)
    assert _folders(tmp_path) == [f"{key}.partial"]
    seen = []

    def resume(folder: Path) -> dict:
        seen.append(sorted(p.name for p in folder.iterdir()))
        return {}

    run_stage(POLICY, resume, _inputs(tmp_path), resumable=True)
    assert seen == [["0.txt", "1.txt"]] and _folders(tmp_path) == [key]


def test_disk_full_while_writing_the_manifest(tmp_path, monkeypatch):
    def no_space(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(stage, "_write_text_atomic", no_space)
    with pytest.raises(OSError, match="No space left on device"):
        run_stage(POLICY, _good([]), _inputs(tmp_path))
    assert _folders(tmp_path) == []


def test_refresh_starts_a_resumable_stage_afresh(tmp_path):
    key = POLICY.content_key(_inputs(tmp_path))
    with pytest.raises(OSError):
        run_stage(POLICY, _disk_full_after(2), _inputs(tmp_path), resumable=True)
    seen = []

    def build(folder: Path) -> dict:
        seen.append(sorted(p.name for p in folder.iterdir()))
        return {}

    run_stage(POLICY, build, _inputs(tmp_path, refresh=True), resumable=True)
    assert seen == [[]] and _folders(tmp_path) == [key]


def test_a_refresh_killed_between_its_renames_is_cleaned_up(tmp_path):
    calls: list = []
    first = run_stage(POLICY, _good(calls), _inputs(tmp_path))
    final = Path(first["output"])
    os.rename(final, final.with_name(f"{final.name}.old-12345"))  # killed after the first rename
    second = run_stage(POLICY, _good(calls), _inputs(tmp_path))
    assert len(calls) == 2 and is_finished(second["output"])
    assert _folders(tmp_path) == [final.name]


def _hold_lock_and_build(work: str, ready) -> None:
    def build(folder: Path) -> dict:
        (folder / "half.txt").write_text("half")
        ready.set()
        time.sleep(60)
        return {}
    run_stage(POLICY, build, {"n": 1, "work_dir": work})


def test_sigkill_while_building_releases_the_lock_and_the_next_run_rebuilds(tmp_path):
    ready = multiprocessing.get_context("fork").Event()
    child = multiprocessing.get_context("fork").Process(target=_hold_lock_and_build,
                                                        args=(str(tmp_path / "work"), ready))
    child.start()
    try:
        assert ready.wait(30)
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    finally:
        if child.is_alive():
            child.kill()
    key = POLICY.content_key(_inputs(tmp_path))
    assert _folders(tmp_path) == [f"{key}.partial"] and not is_finished(tmp_path / "work" / "demo" / key)
    calls: list = []
    t0 = time.monotonic()
    result = run_stage(POLICY, _good(calls), _inputs(tmp_path))
    assert time.monotonic() - t0 < 10, "waited for the dead process's lock"
    assert len(calls) == 1 and _folders(tmp_path) == [key]
    assert not (Path(result["output"]) / "half.txt").exists()
    assert json.loads((Path(result["output"]) / "manifest.json").read_text())["key"] == key
