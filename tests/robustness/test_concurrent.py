"""Two users at once: two runs of the pipeline on one work directory, and two ``segment-volume``
runs into one output, each a process with a Prefect home of its own (two users, or two machines
sharing the work directory). Both end correctly, the work is done once, nothing is corrupted.

- The pipeline: each stage folder is locked per key (tasks/stage.py), so the later run waits for
  the earlier one's stage and reuses it; the champion export is written by one run at a time.
- segment-volume: the second run is held, by a fault wrapper, between its plan (every block to do)
  and its first block until the first run has finished the whole output and removed its scratch
  arrays; it must then find the output complete instead of writing into arrays that are gone.
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from robustness_support import (REPO, STAGES, Pipeline, cli_env, error_lines, new_home, stop_leftovers,
                                wait_for)
from tasks.stage import find_damage

pytestmark = pytest.mark.slow

SEGMENT = REPO / "flows" / "segment.py"


@pytest.fixture
def homes(tmp_path, migrated_db):
    """Two Prefect homes (two users); processes left behind are stopped afterwards."""
    made = [new_home(tmp_path / f"home-{user}", migrated_db) for user in ("a", "b")]
    yield made
    for home in made:
        stop_leftovers(home)


def _cut(isbi: dict, folder: Path, frames: int = 6, test: int = 2, side: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, key, n in (("train-volume.tif", "volume", frames), ("train-labels.tif", "labels", frames),
                         ("test-volume.tif", "test", test)):
        tifffile.imwrite(folder / name, np.ascontiguousarray(isbi[key][:n, 200:200 + side, 200:200 + side]),
                         photometric="minisblack")
    return folder


def test_two_pipeline_runs_on_one_work_dir(isbi, homes, tmp_path):
    """The smallest run there is (6 frames of 64x64, smoke, 1 epoch), twice at once."""
    data, work = _cut(isbi, tmp_path / "data"), tmp_path / "work"
    args = ["--data-dir", str(data), "--work-dir", str(work), "--preset", "smoke", "--epochs", "1"]
    pipes = [Pipeline(home, tmp_path / "logs") for home in homes]
    runs = [pipe.start(args, name) for pipe, name in zip(pipes, ("a", "b"))]
    outputs = []
    for pipe, proc in zip(pipes, runs):
        assert proc.wait(900) == 0, pipe.output(proc)[1][-3000:]
        outputs.append(pipe.output(proc))
    for out, err in outputs:
        assert "Traceback" not in err and error_lines(err) == [], err[-3000:]
    trained = [bool(re.search(r"\bepoch 1/1\b", err)) for _, err in outputs]
    assert sum(trained) == 1, f"the model was trained by {sum(trained)} runs"
    summaries = [json.loads(p.read_text()) for p in sorted((work / "runs").glob("*/summary.json"))
                 if p.parent.name != "latest"]
    assert len(summaries) == 2
    a, b = summaries
    assert {s: a["stages"][s]["output"] for s in STAGES} == {s: b["stages"][s]["output"] for s in STAGES}
    assert a["metrics"] == b["metrics"]
    for stage in STAGES:
        folder = Path(a["stages"][stage]["output"])
        assert [p.name for p in (work / stage).iterdir()] == [folder.name], stage  # no .partial, no .old-*
        assert find_damage(folder, verify=True) is None, stage
    export = json.loads((work / "champion-export" / "model.json").read_text())
    for name, digest in export["sha256"].items():
        if name != "checkpoint":
            path = work / "champion-export" / export["files"][name]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, name
    assert not list((work / "champion-export").glob(".*tmp*"))


# --- segment-volume ------------------------------------------------------------------------------

HOLD = '''
import os, runpy, sys, time
from pathlib import Path
import flows.segment  # first: it sets the Prefect environment (server start-up timeout) before prefect loads
import tasks.segment as segment

real = segment.blocks_to_do

def blocks_to_do(plan):
    """The blocks to do as the plan found them; then HELD is written and the run waits until the
    file RELEASE exists."""
    todo = real(plan)
    Path(os.environ["HELD"]).write_text(str(todo))
    while not Path(os.environ["RELEASE"]).exists():
        time.sleep(0.1)
    return todo

segment.blocks_to_do = flows.segment.blocks_to_do = blocks_to_do  # the flow runs as flows.segment
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    """A train stage folder holding a smoke UNet with its initial weights: no training needed, the
    same network for both runs."""
    import mindspore as ms

    from unet.model import UNet
    from unet.recipes import get_preset

    recipe = get_preset("smoke").to_dict()
    folder = tmp_path_factory.mktemp("model") / "train" / "random0000000000"
    folder.mkdir(parents=True)
    ms.set_seed(0)
    ms.save_checkpoint(UNet(recipe["in_channels"], recipe["base_channels"]), str(folder / "best.ckpt"))
    (folder / "manifest.json").write_text(json.dumps({"stage": "train", "inputs": {"recipe": recipe},
                                                      "result": {"best_checkpoint": "best.ckpt"}}))
    return folder


def _segment(home: Path, args: list[str], log: Path, wrapper: Path | None = None,
             env: dict | None = None) -> subprocess.Popen:
    command = [sys.executable, *([str(wrapper)] if wrapper else []), str(SEGMENT), *args]
    with open(log, "w") as err:
        return subprocess.Popen(command, env={**cli_env(home), **(env or {})}, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=err)


def test_two_segment_volume_runs_into_one_output(isbi, random_model, homes, tmp_path):
    """Both runs plan the same output with every block to do; then b waits until a has written the
    whole output and removed its scratch arrays. b ends too, with exit code 0, and leaves the output
    exactly as a wrote it (before the output lock, b failed: ".segment/work.zarr does not exist")."""
    volume = tmp_path / "stack.tif"
    tifffile.imwrite(volume, np.ascontiguousarray(isbi["test"][:4, :256, :256]), photometric="minisblack")
    out = tmp_path / "out"
    args = [str(volume), "--model", str(random_model), "--output", str(out), "--format", "tiff",
            "--work-dir", str(tmp_path / "work")]
    wrapper = tmp_path / "hold.py"
    wrapper.write_text(HOLD)
    held_a, held_b, complete = tmp_path / "a-held", tmp_path / "b-held", out / ".segment" / "complete.json"
    a = _segment(homes[0], args, tmp_path / "a.err", wrapper, {"HELD": str(held_a), "RELEASE": str(held_b)})
    try:
        wait_for(held_a.exists, a, 600, "run a to plan")
        b = _segment(homes[1], args, tmp_path / "b.err", wrapper, {"HELD": str(held_b), "RELEASE": str(complete)})
        try:
            assert a.wait(600) == 0, (tmp_path / "a.err").read_text()[-3000:]
            first = {name: tifffile.imread(out / name) for name in ("probabilities.tif", "masks.tif", "cells.tif")}
            assert b.wait(600) == 0, (tmp_path / "b.err").read_text()[-3000:]
        finally:
            b.kill()
    finally:
        a.kill()
    for name in ("a.err", "b.err"):
        err = (tmp_path / name).read_text()
        assert "Traceback" not in err and error_lines(err) == [], err[-3000:]
    assert held_a.read_text() == held_b.read_text() == "[0, 1, 2, 3]"  # both planned every block
    assert first["probabilities.tif"].std() > 0  # (the untrained model's mask and cells are empty)
    for name, array in first.items():
        np.testing.assert_array_equal(tifffile.imread(out / name), array, err_msg=name)
    assert sorted(p.name for p in (out / ".segment").iterdir()) == ["blocks", "complete.json", "plan.json",
                                                                    "sections"]
