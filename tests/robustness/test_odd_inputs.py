"""Unusual but valid input through the whole pipeline, and a full disk while a stage writes:
``main([...])`` in-process against a temporary Prefect server (smoke preset, 1-2 epochs)."""
from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

import flows.cli as fp
from robustness_support import SMOKE, STAGES, finished, make_data, only, states, summary_of

pytestmark = pytest.mark.slow


def _png(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def _frames(folder: Path) -> np.ndarray:
    return np.stack([_png(p) for p in sorted(folder.glob("*.png"))])


@pytest.fixture(scope="module")
def odd_run(prefect_env, isbi, isbi_dir, tmp_path_factory) -> dict:
    """One smoke run on the smallest, oddest valid input: 3 labelled frames (2 train, 1 val) of
    100x100 stored as uint16 with float 0/1 labels, and 2 RGB colour test frames of 96x120
    (neither size a multiple of 16: the UNet pads internally)."""
    V, L = (np.ascontiguousarray(isbi[k][:3, 50:150, 300:400]) for k in ("volume", "labels"))
    T = np.ascontiguousarray(isbi["test"][:2, 10:106, 20:140])
    colour = np.ascontiguousarray(np.stack([T, T // 2, 255 - T], axis=-1))
    root = tmp_path_factory.mktemp("odd")
    data = make_data(root / "data", isbi_dir, train_volume=V.astype(np.uint16) * 257,
                     train_labels=(L > 0).astype(np.float32), test_volume=colour)
    work = root / "work"
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # the conversion notes of unet.frames, INFO and up
    notes = logging.getLogger("unet.frames")
    level = notes.level
    notes.addHandler(handler)
    notes.setLevel(logging.INFO)
    try:
        code = fp.main(["--data-dir", str(data), "--work-dir", str(work), *SMOKE, "--epochs", "2"])
    finally:
        notes.removeHandler(handler)
        notes.setLevel(level)
    assert code == 0
    return {"data": data, "work": work, "summary": summary_of(work), "V": V, "L": L, "colour": colour,
            "notes": [r.getMessage() for r in records if r.name == "unet.frames"]}


def test_converted_stacks_run_end_to_end(odd_run):
    """uint16 volume, RGB colour test volume, float 0/1 labels: each converted with one logged
    note naming the file, and the extracted frames are what the conversion promises."""
    data, notes = odd_run["data"], odd_run["notes"]
    for path, fragment in (("train-volume.tif", "uint16 pixels"), ("test-volume.tif", "converted to grey"),
                           ("train-labels.tif", "labels 0/1 mapped to 0/255")):
        found = [n for n in notes if n.startswith(str(data / path)) and fragment in n]
        assert len(found) == 1, (path, fragment, notes)
    extract = Path(odd_run["summary"]["stages"]["extract"]["output"])
    assert np.array_equal(_frames(extract / "images"), odd_run["V"])
    assert np.array_equal(_frames(extract / "masks"), np.where(odd_run["L"] > 0, 255, 0))
    grey = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in odd_run["colour"]])
    assert np.array_equal(_frames(extract / "test"), grey)


def test_small_odd_sized_frames_and_three_labelled_frames(odd_run):
    """Every stage ran, and the predictions come back at each frame's own size."""
    summary = odd_run["summary"]
    assert states(summary) == only(*STAGES)
    split = json.loads((Path(summary["stages"]["split"]["output"]) / "manifest.json").read_text())
    assert split["result"]["counts"] == {"train": 2, "val": 1, "test": 2}
    out = summary["outputs"]
    assert [_png(p).shape for p in sorted(Path(out["val_predictions"]).glob("*.png"))] == [(100, 100)]
    assert [_png(p).shape for p in sorted(Path(out["test_masks"]).glob("*.png"))] == [(96, 120)] * 2
    assert tifffile.imread(out["test_probabilities"]).shape == (2, 96, 120)
    assert all(0.0 <= summary["metrics"]["val_native"][m] <= 1.0 for m in ("acc", "iou", "dice"))


def test_disk_full_while_extracting(prefect_env, isbi, isbi_dir, tmp_path, capsys, monkeypatch):
    """ENOSPC from a write() in the middle of the first stage: one line naming the stage folder,
    exit code 1, no finished folder, no half-written frames kept, no summary; the next run works."""
    import unet.frames

    V, L, T = (np.ascontiguousarray(isbi[k][:6, :64, :64]) for k in ("volume", "labels", "test"))
    data = make_data(tmp_path / "data", isbi_dir, train_volume=V, train_labels=L, test_volume=T[:2])
    work = tmp_path / "work"
    write, calls = unet.frames._write_png, []

    def disk_full_after_four(frame, path):
        calls.append(path)
        if len(calls) > 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a failed write() raises
        write(frame, path)

    monkeypatch.setattr(unet.frames, "_write_png", disk_full_after_four)
    args = ["--data-dir", str(data), "--work-dir", str(work), *SMOKE, "--epochs", "1"]
    code = fp.main(args)
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "No space left on device (while writing the extract stage)" in lines[0]
    assert str(work / "extract") in lines[0]
    assert not finished(work, "extract")
    assert list((work / "extract").iterdir()) == [], "a half-written stage folder was kept"
    assert not (work / "runs").exists()

    monkeypatch.setattr(unet.frames, "_write_png", write)
    assert fp.main(args) == 0, capsys.readouterr().err[-3000:]
    summary = summary_of(work)
    assert states(summary) == only(*STAGES)
    assert len(list((Path(summary["stages"]["extract"]["output"]) / "images").glob("*.png"))) == 6
    assert json.loads((work / "champion.json").read_text())["model"]["key"] == Path(
        summary["stages"]["train"]["output"]).name
