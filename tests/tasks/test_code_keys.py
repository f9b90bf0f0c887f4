"""A stage's code key covers exactly the project modules its task imports, found from the source:
edit one module's content in a copy of the project and exactly the stages that import it, directly
or not, get a new key."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import tasks.stage as stage
from tasks.stage import code_closure, code_version

REPO = Path(__file__).resolve().parents[2]
STAGES = {"extract": ("tasks/extract.py",), "split": ("tasks/split.py",), "datasets": ("tasks/datasets.py",),
          "train": ("tasks/train.py", "unet/msrun_worker.py"), "evaluate": ("tasks/evaluate.py",),
          "predict": ("tasks/predict.py",)}
ALL = set(STAGES)


def digests(root: Path) -> dict[str, str]:
    return {name: code_version(code_closure(modules, root), root) for name, modules in STAGES.items()}


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    for package in ("unet", "tasks", "flows"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


# Which stages import each module, read off the import statements by hand (the expected values):
# tasks/stage.py is every task's; unet/recipes.py reaches datasets through unet/dataset_check.py
# (the module the old hand-written list forgot) and evaluate/predict through unet/infer.py;
# unet/blocks.py is the inference engine of evaluate and predict (unet/infer.py); evaluate imports
# tasks/train.py (dataset_pairs); unet/volume_io.py and unet/labels.py are extract's readers and label
# conversions; the segmentation flow's other modules and the command lines are no stage's.
EDITS = [
    ("tasks/stage.py", ALL),
    ("unet/__init__.py", ALL),
    ("unet/frames.py", {"extract"}),
    ("unet/split.py", {"split", "datasets"}),
    ("unet/recipes.py", {"datasets", "train", "evaluate", "predict"}),
    ("unet/metrics.py", {"train", "evaluate", "predict"}),
    ("unet/msrun_worker.py", {"train"}),
    ("tasks/train.py", {"train", "evaluate"}),
    ("unet/blocks.py", {"evaluate", "predict"}),
    ("unet/backends.py", {"evaluate", "predict"}),
    ("unet/tta.py", {"evaluate", "predict"}),  # the views of unet/blocks.py and unet/backends.py
    ("unet/checkpoint.py", {"evaluate", "predict"}),  # unet/infer.py's load_model (through backends)
    ("unet/formats.py", {"extract"}),  # unet/frames.py's check of renamed files
    ("unet/viz.py", {"evaluate", "predict"}),
    ("unet/volume_io.py", {"extract"}),  # reads training volumes given as folders of frames or Zarr arrays
    ("unet/labels.py", {"extract"}),
    ("tasks/segment.py", set()),
    ("flows/cli.py", set()),
    ("flows/parameters.py", set()),
    ("flows/command.py", set()),
    ("flows/temporary_server.py", set()),
]


@pytest.mark.parametrize("module,expected", EDITS, ids=[m for m, _ in EDITS])
def test_editing_a_module_changes_the_keys_of_exactly_the_stages_that_import_it(copy, module, expected):
    before = digests(copy)
    path = copy / module
    original = path.read_text()
    try:
        path.write_text(original + "\nEDITED_BY_THE_TEST = 1\n")  # content, not name
        after = digests(copy)
    finally:
        path.write_text(original)
    assert {name for name in STAGES if after[name] != before[name]} == expected
    assert digests(copy) == before  # and back


def test_a_comment_only_edit_changes_the_key_too(copy):
    # the source is hashed as it is (not normalised): a comment is a change, on the safe side
    before = digests(copy)["split"]
    path = copy / "unet" / "split.py"
    original = path.read_text()
    try:
        path.write_text(original + "\n# a comment\n")
        assert digests(copy)["split"] != before
    finally:
        path.write_text(original)


def test_a_library_version_that_changes_results_changes_every_key(copy, monkeypatch):
    before = digests(copy)
    real = stage.version
    monkeypatch.setattr(stage, "version", lambda p: "0.0-test" if p == "scikit-image" else real(p))
    after = digests(copy)
    assert all(after[name] != before[name] for name in STAGES)


def test_the_stage_policies_use_the_closure_of_their_task_module():
    from tasks.datasets import POLICY as DATASETS
    from tasks.predict import POLICY as PREDICT
    from tasks.train import POLICY as TRAIN

    assert "unet/recipes.py" in DATASETS.code and "unet/dataset_check.py" in DATASETS.code
    assert {"unet/blocks.py", "unet/backends.py", "unet/infer.py"} <= set(PREDICT.code)
    assert "unet/msrun_worker.py" in TRAIN.code
    assert TRAIN.code_digest == code_version(code_closure(STAGES["train"]))
