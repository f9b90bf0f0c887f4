"""Verified cache hits and a full disk (tasks/stage.py).

A finished stage folder's manifest records the size and sha256 of every file; a damaged folder
(a truncated or deleted file always, an edit of the same size with ``verify``) is logged with one
warning naming it and its first bad file, and the stage is built again. A disk that fills up while
a stage writes (a real, tiny tmpfs: needs root, else skipped) leaves no partial folder and nothing
finished. The last tests run the whole pipeline in-process on a cut of the real stacks (slow)."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tasks.stage import StagePolicy, file_digest, find_damage, is_finished, outputs_exist, run_stage, verifying

POLICY = StagePolicy(stage="demo", code=("tasks/stage.py",))
STAGES = ["extract", "split", "datasets", "train", "evaluate", "predict"]


def _inputs(work: Path, **extra) -> dict:
    return {"n": 1, "work_dir": str(work), **extra}


def _writer(calls: list, content: bytes = b"0123456789"):
    def build(folder: Path) -> dict:
        calls.append(folder)
        (folder / "sub").mkdir()
        (folder / "sub" / "data.bin").write_bytes(content)
        (folder / "note.txt").write_text("note")
        return {"data": "sub/data.bin"}
    return build


@pytest.fixture
def warnings(caplog):
    """The warnings tasks.stage logs (outside Prefect: to its module logger)."""
    caplog.set_level(logging.WARNING, logger="tasks.stage")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "tasks.stage"]


@pytest.fixture
def finished_stage(tmp_path) -> tuple[Path, list]:
    calls: list = []
    result = run_stage(POLICY, _writer(calls), _inputs(tmp_path / "work"))
    return Path(result["output"]), calls


def test_the_manifest_records_size_and_sha256_of_every_file(finished_stage):
    folder, _ = finished_stage
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert files == {"note.txt": {"size": 4, "sha256": file_digest(folder / "note.txt")},
                     "sub/data.bin": {"size": 10, "sha256": file_digest(folder / "sub" / "data.bin")}}
    assert find_damage(folder) is None and find_damage(folder, verify=True) is None


@pytest.mark.parametrize("damage, problem", [
    (lambda f: (f / "sub" / "data.bin").write_bytes(b"01234"), "sub/data.bin: 5 bytes, expected 10"),
    (lambda f: (f / "note.txt").unlink(), "note.txt: missing"),
    (lambda f: (f / "manifest.json").write_text('{"stage": "de'), "manifest.json: unreadable"),
], ids=["truncated", "deleted", "manifest-cut"])
def test_a_truncated_or_deleted_file_is_logged_and_the_stage_built_again(tmp_path, finished_stage, warnings,
                                                                         damage, problem):
    folder, calls = finished_stage
    damage(folder)
    assert problem in find_damage(folder)
    result = run_stage(POLICY, _writer(calls), _inputs(tmp_path / "work"))
    assert len(calls) == 2 and result["output"] == str(folder)
    [line] = warnings()
    assert line.startswith(f"{folder}: damaged stage folder (") and problem in line
    assert find_damage(folder, verify=True) is None  # rebuilt whole
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # the damaged copy is gone


def _reused_then_rebuilt_under_verify(tmp_path, calls, warnings) -> str:
    """Run the stage twice: reused without a warning, then built again under verifying(); returns
    the one warning the second run logged."""
    run_stage(POLICY, _writer(calls), _inputs(tmp_path / "work"))
    assert len(calls) == 1 and warnings() == []
    with verifying():
        run_stage(POLICY, _writer(calls), _inputs(tmp_path / "work"))
    assert len(calls) == 2
    [line] = warnings()
    return line


def test_an_edit_of_the_same_size_is_found_by_verify_only(tmp_path, finished_stage, warnings):
    folder, calls = finished_stage
    (folder / "sub" / "data.bin").write_bytes(b"0123456780")
    assert find_damage(folder) is None  # the cheap check only sees sizes
    line = _reused_then_rebuilt_under_verify(tmp_path, calls, warnings)
    assert "sub/data.bin: content differs from its sha256 in the manifest" in line
    assert (folder / "sub" / "data.bin").read_bytes() == b"0123456789"


def test_a_folder_of_an_older_version_is_reused_and_recomputed_under_verify(tmp_path, finished_stage, warnings):
    """Manifests written before the file records existed: reused as before (nothing to check them
    against); with verify they cannot be verified, so the stage is built again."""
    folder, calls = finished_stage
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    line = _reused_then_rebuilt_under_verify(tmp_path, calls, warnings)
    assert "written by an older version" in line
    assert "files" in json.loads((folder / "manifest.json").read_text())


def test_a_damaged_folder_is_no_output(tmp_path, warnings):
    """What a champion record is checked with (tasks/promote.py read_champion): a damaged model is
    not used."""
    result = run_stage(POLICY, _writer([]), _inputs(tmp_path / "work"))
    assert outputs_exist(result) and warnings() == []
    (Path(result["output"]) / "sub" / "data.bin").write_bytes(b"")
    assert not outputs_exist(result)
    assert warnings() == [f"{result['output']}: damaged stage folder (sub/data.bin: 0 bytes, expected 10); not used"]


# --- a real full disk: a tmpfs of a few pages ---------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs mounted for the test (root only)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _used(mount: Path) -> int:
    stat = os.statvfs(mount)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def _fill(folder: Path, name: str) -> None:
    """Write ``name`` until the disk is full (a real ENOSPC from write(), without a file name)."""
    with (folder / name).open("wb") as f:
        while True:
            f.write(b"x" * 4096)
            f.flush()


def test_a_full_disk_in_a_build_removes_the_partial_folder(tiny_disk):
    work = tiny_disk / "work"
    key = POLICY.content_key(_inputs(work))
    before = _used(tiny_disk)

    def build(folder: Path) -> dict:
        (folder / "first.txt").write_text("ok")
        _fill(folder, "big.bin")
        return {}

    with pytest.raises(OSError) as err:
        run_stage(POLICY, build, _inputs(work))
    assert err.value.errno == errno.ENOSPC
    assert err.value.filename == str(work / "demo" / f"{key}.partial")
    assert os.listdir(work / "demo") == [] and not is_finished(work / "demo" / key)
    assert _used(tiny_disk) <= before + 8192, "the partial folder's space was not freed"
    calls: list = []
    result = run_stage(POLICY, _writer(calls), _inputs(work))  # with the space back, it works
    assert len(calls) == 1 and find_damage(result["output"], verify=True) is None


def test_a_disk_that_fills_up_with_the_files_fails_the_manifest_and_keeps_nothing(tiny_disk):
    """The build's own writes fit exactly; the manifest no longer does."""
    work = tiny_disk / "work"

    def build(folder: Path) -> dict:
        try:
            _fill(folder, "big.bin")
        except OSError:
            pass  # the build keeps what fitted and returns: the disk is now full
        return {}

    with pytest.raises(OSError) as err:
        run_stage(POLICY, build, _inputs(work))
    assert err.value.errno == errno.ENOSPC and "while writing the demo stage" in str(err.value)
    assert os.listdir(work / "demo") == []


# --- the pipeline: damaged stages and a full disk, in-process on a cut of the real stacks --------

@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    """A temporary Prefect server, home and result storage (results persist: cache hits happen)."""
    from prefect.settings import PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home-verify")
    with temporary_settings({PREFECT_HOME: str(home), PREFECT_LOCAL_STORAGE_PATH: str(home / "storage")}):
        with prefect_test_harness(server_startup_timeout=300):  # slow on a loaded machine
            yield home


@pytest.fixture(scope="module")
def small_data(isbi_dir, tmp_path_factory) -> Path:
    """6 labelled and 2 test frames of 64x64 cut from the real stacks."""
    folder = tmp_path_factory.mktemp("data")
    for name, frames in (("train-volume.tif", 6), ("train-labels.tif", 6), ("test-volume.tif", 2)):
        stack = tifffile.imread(isbi_dir / name)[:frames, 200:264, 200:264]
        tifffile.imwrite(folder / name, np.ascontiguousarray(stack), photometric="minisblack")
    return folder


@pytest.fixture
def stage_warnings(monkeypatch):
    """The damage warnings tasks.stage logs during in-process runs (recorded, then logged as usual;
    a handler on Prefect's loggers does not survive the flow runs' logging set-up)."""
    import tasks.stage as stage

    found: list[str] = []
    real = stage._log

    class Recorder:
        def warning(self, message: str, *args) -> None:
            found.append(message % args)
            real().warning(message, *args)

    monkeypatch.setattr(stage, "_log", Recorder)
    return found


def _consoles_to_this_tests_stderr() -> None:
    """Prefect's console handlers keep the stream they were made with: in-process runs of an
    earlier test left them writing into that test's closed capture ("--- Logging error ---")."""
    import logging
    import sys

    for logger in [logging.getLogger(), *map(logging.getLogger, logging.root.manager.loggerDict)]:
        for handler in getattr(logger, "handlers", []):
            if hasattr(handler, "console"):
                handler.console.file = sys.stderr


def _run(args: list[str], capsys) -> dict:
    import flows.cli as cli

    _consoles_to_this_tests_stderr()
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    latest = Path(args[args.index("--work-dir") + 1]) / "runs" / "latest" / "summary.json"
    summary = json.loads(latest.read_text())
    return {"summary": summary, "states": {s: summary["stages"][s]["state"] for s in STAGES},
            "folders": {s: Path(summary["stages"][s]["output"]) for s in STAGES}}


def _only(*ran: str) -> dict[str, str]:
    return {s: ("Completed" if s in ran else "Cached") for s in STAGES}


@pytest.mark.slow
def test_the_pipeline_recomputes_exactly_the_damaged_stages(prefect_env, small_data, tmp_path, capsys,
                                                            stage_warnings):
    work = tmp_path / "work"
    args = ["--data-dir", str(small_data), "--work-dir", str(work), "--preset", "smoke", "--epochs", "1"]
    first = _run(args, capsys)
    folders = first["folders"]
    reference = {s: json.loads((folders[s] / "manifest.json").read_text())["files"] for s in STAGES}
    assert all(find_damage(f, verify=True) is None for f in folders.values())

    # a truncated checkpoint: found by its size, training runs again (seeded: the same weights)
    checkpoint = folders["train"] / "best.ckpt"
    checkpoint.chmod(0o600)  # mindspore.save_checkpoint writes it read-only
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    assert _run(args, capsys)["states"] == _only("train")
    [line] = stage_warnings
    assert line.startswith(f"{folders['train']}: damaged stage folder (best.ckpt: 1000 bytes, expected ")

    # a deleted PNG of the test masks: only predict runs again
    (folders["predict"] / "test" / "masks" / "00000.png").unlink()
    assert _run(args, capsys)["states"] == _only("predict")
    assert f"{folders['predict']}: damaged stage folder (test/masks/00000.png: missing)" in stage_warnings[1]

    # a frame edited in place (same size): unseen by the size check, found by --verify
    frame = folders["extract"] / "images" / "00003.png"
    data = bytearray(frame.read_bytes())
    data[-20] ^= 0xFF
    frame.write_bytes(bytes(data))
    assert _run(args, capsys)["states"] == _only()
    assert len(stage_warnings) == 2
    assert _run([*args, "--verify"], capsys)["states"] == _only("extract")
    assert "images/00003.png: content differs from its sha256 in the manifest" in stage_warnings[2]
    assert len(stage_warnings) == 3
    # every stage whole again, each file as the first run wrote it (but history.csv: it holds each
    # epoch's seconds, which a second training does not repeat)
    for s in STAGES:
        assert find_damage(folders[s], verify=True) is None
        files = json.loads((folders[s] / "manifest.json").read_text())["files"]
        assert files.keys() == reference[s].keys(), s
        assert ({k: v["sha256"] for k, v in files.items() if k != "history.csv"}
                == {k: v["sha256"] for k, v in reference[s].items() if k != "history.csv"}), s


@pytest.mark.slow
def test_a_full_disk_during_the_pipeline_is_one_line_and_leaves_nothing(prefect_env, small_data, tiny_disk,
                                                                       capsys):
    """A work directory on a 64 KiB tmpfs with 16 KiB left: the extract stage's frames (14 PNGs of
    about 4 KiB) do not fit."""
    import flows.cli as cli

    (tiny_disk / "ballast").write_bytes(b"x" * 48 * 1024)
    ballast = _used(tiny_disk)
    work = tiny_disk / "work"
    _consoles_to_this_tests_stderr()
    code = cli.main(["--data-dir", str(small_data), "--work-dir", str(work), "--preset", "smoke", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    [line] = [x for x in err.splitlines() if x.startswith("error:")]
    assert line.startswith(f"error: {work / 'extract'}/") and line.endswith(
        ".partial: No space left on device (while writing the extract stage)"), line
    assert os.listdir(work / "extract") == [] and not (work / "runs").exists()
    assert _used(tiny_disk) <= ballast + 8192, "the partial folder's space was not freed"
    shutil.rmtree(work)
