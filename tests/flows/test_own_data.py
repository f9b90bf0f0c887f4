"""Train on your own data: the three ways in, data lists, their one-line errors, extract keys that
follow content, kind and membrane width; end to end, a data list of two volumes of different
frame sizes (one instance-labelled) and no test volume trains, evaluates and promotes."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from skimage.measure import label

from flows.cli import main
from flows.command import EXIT_FAILED, EXIT_USAGE
from flows.parameters import extract_parameters
from tasks.extract import POLICY as EXTRACT
from unet.data_list import read_data_list, resolve_inputs


def _tif(path: Path, array: np.ndarray) -> str:
    tifffile.imwrite(path, array, photometric="minisblack")
    return str(path)


@pytest.fixture
def small(tmp_path) -> Path:
    """A folder with image.tif (6 x 32 x 40), ids.tif (instance labels: two touching cells) and
    labels.tif (binary), and list.csv naming the first two with relative paths."""
    rng = np.random.default_rng(0)
    _tif(tmp_path / "image.tif", rng.integers(0, 256, (6, 32, 40), dtype=np.uint8))
    ids = np.zeros((6, 32, 40), np.uint32)
    ids[:, 4:28, 4:20], ids[:, 4:28, 20:36] = 1, 2
    _tif(tmp_path / "ids.tif", ids)
    _tif(tmp_path / "labels.tif", (ids > 0).astype(np.uint8) * 255)
    (tmp_path / "list.csv").write_text("image,labels,kind\nimage.tif,ids.tif,instances\n")
    return tmp_path


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


# --- data lists ----------------------------------------------------------------------------------

def test_a_data_list_resolves_paths_against_its_own_folder(small, monkeypatch, tmp_path_factory):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    pairs = read_data_list(small / "list.csv")
    assert pairs == [{"kind": "instances", "image": str(small / "image.tif"), "labels": str(small / "ids.tif")}]
    (small / "list.yaml").write_text("- {image: image.tif, labels: labels.tif, kind: membrane}\n"
                                     f"- {{image: {small / 'ids.tif'}, labels: ids.tif, kind: instances}}\n")
    assert [p["kind"] for p in read_data_list(small / "list.yaml")] == ["membrane", "instances"]


@pytest.mark.parametrize("text, message", [
    ("image,labels\nimage.tif,ids.tif\n", r"list\.csv: missing column\(s\) kind; expected a CSV with the header "
                                          "image,labels,kind"),
    ("image,labels,kind\n", r"list\.csv: no rows"),
    ("image,labels,kind\nimage.tif,ids.tif,neurons\n", r"list\.csv row 2: unknown labels kind 'neurons', expected "
                                                       "one of membrane, cells, instances"),
    ("image,labels,kind\nimage.tif,ids.tif,\n", r"list\.csv row 2: empty kind"),
    ("image,labels,kind\nimage.tif,nope.tif,instances\n", r"list\.csv row 2: labels .*nope\.tif not found"),
    ("image,labels,kind\nimage.tif,ids.tif,instances\n\nimage.tif,labels.tif,membrane\n",
     r"list\.csv row 4: image .*image\.tif is listed twice \(first in row 2\)"),
])
def test_bad_data_lists_are_one_line_errors(small, capsys, text, message):
    (small / "list.csv").write_text(text)
    code, err = _run(["--data-list", str(small / "list.csv"), "--work-dir", str(small / "work")], capsys)
    assert code == EXIT_FAILED and len(err) == 1
    assert err[0].startswith("error: ") and re.search(message, err[0]), err[0]
    assert not (small / "work").exists()


@pytest.mark.parametrize("argv, message", [
    (["--data-dir", "d", "--data-list", "l.csv"], "give one of data_dir, train_volume with train_labels, or "
                                                  "data_list; got data_dir and data_list"),
    (["--train-volume", "v.tif"], "train_volume and train_labels go together; train_labels is missing"),
    (["--labels-kind", "cells"], "labels_kind goes with train_labels"),
    (["--data-dir", "d", "--test-volume", "t.tif"], "test_volume goes with train_volume/train_labels or data_list"),
    (["--train-volume", "v", "--train-labels", "l", "--labels-kind", "ids"], "argument --labels-kind: invalid choice"),
    (["--membrane-width", "3"], "argument --membrane-width: expected an even number of pixels >= 2, got '3'"),
])
def test_mixed_ways_in_are_usage_errors(capsys, argv, message):
    code, err = _run(argv, capsys)
    assert code == EXIT_USAGE and len(err) == 1 and message in err[0], err


# --- bad label volumes, checked before anything starts -----------------------------------------------

@pytest.mark.parametrize("labels, kind, message", [
    (np.zeros((5, 32, 40), np.uint32), "instances", r"image\.tif has shape \(6, 32, 40\) but .*bad\.tif has shape "
                                                    r"\(5, 32, 40\); expected the same frame count and size"),
    (np.zeros((6, 32, 36), np.uint8), "membrane", r"but .*bad\.tif has shape \(6, 32, 36\)"),
    (np.full((6, 32, 40), 1.5, np.float32), "instances", r"bad\.tif: float32 labels, expected integer instance ids"),
    (np.full((6, 32, 40), 2**40, np.uint64), "instances", r"bad\.tif: instance id 1099511627776 is above 2\^32 - 1"),
    (np.arange(6 * 32 * 40, dtype=np.uint16).reshape(6, 32, 40), "membrane",
     r"bad\.tif: labels must be binary .*; if these are instance ids .*declare the labels kind instances"),
])
def test_bad_label_volumes_fail_in_the_command_line_check(small, capsys, labels, kind, message):
    _tif(small / "bad.tif", labels)
    code, err = _run(["--train-volume", str(small / "image.tif"), "--train-labels", str(small / "bad.tif"),
                      "--labels-kind", kind, "--preset", "smoke", "--work-dir", str(small / "work")], capsys)
    assert code == EXIT_FAILED and len(err) == 1 and re.search(message, err[0]), err
    assert not (small / "work").exists()


# --- extract keys ------------------------------------------------------------------------------------

def _key(inputs, width: int = 2, work: str = "/tmp/w") -> str:
    return EXTRACT.content_key({**extract_parameters(inputs, width), "work_dir": work})


def test_extract_keys_follow_content_kind_and_membrane_width(small, tmp_path_factory):
    binary = resolve_inputs(train_volume=str(small / "image.tif"), train_labels=str(small / "labels.tif"))
    cells = resolve_inputs(train_volume=str(small / "image.tif"), train_labels=str(small / "labels.tif"),
                           labels_kind="cells")
    ids = resolve_inputs(data_list=str(small / "list.csv"))
    assert _key(binary) != _key(cells)  # the declared kind is part of the key
    assert _key(ids, 2) != _key(ids, 4)  # so is the width, for instance labels...
    assert _key(binary, 2) == _key(binary, 4)  # ...and only for them
    moved = tmp_path_factory.mktemp("moved")
    for name in ("image.tif", "ids.tif", "list.csv"):
        shutil.copy(small / name, moved / name)
    assert _key(resolve_inputs(data_list=str(moved / "list.csv"))) == _key(ids)  # content, not paths
    _tif(moved / "ids.tif", np.ones((6, 32, 40), np.uint32))
    assert _key(resolve_inputs(data_list=str(moved / "list.csv"))) != _key(ids)


def test_an_isbi_folder_and_the_same_stacks_given_one_by_one_share_the_extract_key(isbi_dir):
    named = resolve_inputs(train_volume=str(isbi_dir / "train-volume.tif"),
                           train_labels=str(isbi_dir / "train-labels.tif"),
                           test_volume=str(isbi_dir / "test-volume.tif"))
    assert _key(resolve_inputs(data_dir=str(isbi_dir))) == _key(named)
    assert _key(resolve_inputs(data_dir=str(isbi_dir))) == _key(resolve_inputs(data_dir=str(isbi_dir)), 6)


# --- end to end -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_volume_list(isbi_dir, tmp_path_factory) -> Path:
    """A data list of two volumes made from ISBI frames: 9 frames of 256x256 with instance labels
    (the 8-connected components of ISBI's mask, as a TIFF of uint32 ids) and 9 frames of 192x224
    with the binary labels as a folder of PNG frames."""
    d = tmp_path_factory.mktemp("own-data")
    images = tifffile.imread(isbi_dir / "train-volume.tif")
    masks = tifffile.imread(isbi_dir / "train-labels.tif")
    _tif(d / "a.tif", images[:9, :256, :256])
    _tif(d / "a-ids.tif", np.stack([label(m > 0) for m in masks[:9, :256, :256]]).astype(np.uint32))
    _tif(d / "b.tif", images[9:18, 100:292, 50:274])
    (d / "b-labels").mkdir()
    for i, m in enumerate(masks[9:18, 100:292, 50:274]):
        cv2.imwrite(str(d / "b-labels" / f"{i:03d}.png"), m)
    (d / "data.csv").write_text("image,labels,kind\na.tif,a-ids.tif,instances\nb.tif,b-labels,membrane\n")
    return d / "data.csv"


@pytest.mark.slow
def test_a_two_volume_data_list_without_test_volume_trains_evaluates_and_promotes(prefect_env, two_volume_list,
                                                                                  tmp_path):
    from flows.full_pipeline import full_pipeline

    summary = full_pipeline(data_list=str(two_volume_list), work_dir=str(tmp_path), preset="smoke", epochs=2)
    assert {name: s["state"] for name, s in summary["stages"].items()} == dict.fromkeys(
        ["extract", "split", "datasets", "train", "evaluate"], "Completed")  # no predict stage
    assert summary["champion"]["decision"] == "promoted"
    assert json.loads((tmp_path / "champion.json").read_text())["model"]["output"] == \
        str(Path(summary["outputs"]["checkpoint"]).parent)
    assert "test_masks" not in summary["outputs"] and summary["parameters"]["test_volume"] is None
    extract = Path(summary["stages"]["extract"]["output"])
    manifest = json.loads((extract / "manifest.json").read_text())
    assert [p["kind"] for p in manifest["inputs"]["pairs"]] == ["instances", "membrane"]
    assert manifest["inputs"]["membrane_width"] == 2
    # the instance labels of ISBI's mask give ISBI's mask back
    back = cv2.imread(str(extract / "masks" / "v0-00004.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(back > 0, tifffile.imread(two_volume_list.parent / "a-ids.tif", key=4) > 0)
    split = (Path(summary["stages"]["split"]["output"]) / "split.csv").read_text().splitlines()
    val = sorted(line.split(",")[0] for line in split[1:] if ",val," in line)
    assert val == ["v0-00000", "v0-00003", "v0-00006", "v1-00000", "v1-00003", "v1-00006"]
    val_native = summary["metrics"]["val_native"]
    assert 0.0 <= val_native["v_rand"] <= 1.0 and 0.0 < val_native["membrane_dice"] < 1.0
    evaluation = Path(summary["stages"]["evaluate"]["output"])
    for volume, shape in (("v0", (256, 256)), ("v1", (192, 224))):
        probs = tifffile.imread(evaluation / "val" / volume / "probabilities.tif")
        assert probs.shape == (3, *shape)
