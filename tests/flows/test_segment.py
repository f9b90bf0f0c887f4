"""segment-volume on real ISBI data with a smoke model trained by the pipeline: equal to the
pipeline's own test prediction, blocks equal to whole frames, resume, refusals, errors, disk full."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import zarr
from skimage.measure import label
from skimage.segmentation import expand_labels

# CI's slice (make test) runs every test here but the two marked only slow: the SIGKILL mid-volume
# resume (about 100 s; robustness of the block store is in the slice through the disk-full test) and
# the bad-precision messages (the precision checks are unit tests in tests/unet/test_precision.py).
pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SEGMENT = REPO / "flows" / "segment.py"


@pytest.fixture(scope="module")
def smoke_work(prefect_env, isbi_dir, tmp_path_factory):
    """A work dir with a champion: the smoke pipeline on the real volumes."""
    from flows.full_pipeline import full_pipeline

    work = tmp_path_factory.mktemp("work")
    summary = full_pipeline(data_dir=str(isbi_dir), work_dir=str(work), preset="smoke")
    return work, summary


@pytest.fixture(scope="module")
def crop_model(smoke_work, tmp_path_factory):
    """A train stage folder whose recipe is the smoke weights run at native resolution (a crop
    recipe, as fullres): the same network class, so blocks and halos matter."""
    work, summary = smoke_work
    folder = Path(summary["stages"]["train"]["output"])
    stage = tmp_path_factory.mktemp("cropwork") / "train" / "crop0001"
    stage.mkdir(parents=True)
    (stage / "best.ckpt").write_bytes((folder / "best.ckpt").read_bytes())
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["inputs"]["recipe"].update(input_mode="crop", name="smoke-crop")
    (stage / "manifest.json").write_text(json.dumps(manifest))
    return stage


@pytest.fixture(scope="module")
def segment(prefect_env):
    from flows.segment import segment_volume

    def run(input, output, **kw):
        return segment_volume(input=str(input), output=str(output), **kw)
    return run


def arrays(out: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(out), mode="r")
    return {"prob": root["0"][:], "mask": root["labels/mask/0"][:], "cells": root["labels/cells/0"][:]}


def frames_folder(folder: Path, stack: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for i, frame in enumerate(stack):
        cv2.imwrite(str(folder / f"s{i:03d}.png"), frame)
    return folder


@pytest.mark.ci_slice
def test_segmenting_the_test_volume_equals_the_pipelines_test_prediction(segment, smoke_work, isbi_dir, tmp_path):
    work, pipeline = smoke_work
    out = tmp_path / "test.ome.zarr"
    # the pipeline predicts with ONNX Runtime (unet.backends.PIPELINE_BACKEND): so does this run by
    # default, for the same masks pixel for pixel
    summary = segment(isbi_dir / "test-volume.tif", out, work_dir=str(work))
    assert summary["backend"] == "onnxruntime"
    predict = Path(pipeline["stages"]["predict"]["output"]) / "test"
    expected = tifffile.imread(predict / "probabilities.tif")
    got = arrays(out)
    diff = float(np.abs(got["prob"] - expected).max())
    print(f"max |segment-volume - predict_test| = {diff:.2e}")
    assert got["prob"].shape == (30, 512, 512) and got["prob"].dtype == np.float32
    assert diff <= 1e-5
    for z in (0, 17, 29):
        png = cv2.imread(str(predict / "masks" / f"{z:05d}.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(got["mask"][z], png)
        # cells: 4-connected components of the mask, grown over the membrane by at most 32 px
        whole = expand_labels(label(expected[z] >= 0.5, connectivity=1), 32)
        np.testing.assert_array_equal(got["cells"][z], whole)
    assert summary["cells"]["total"] == sum(int(c.max()) for c in got["cells"])
    # an OME-Zarr napari's reader opens: the probability image with its two label images
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    names = {node.metadata.get("name"): node.data[0].shape for node in Reader(parse_url(str(out)))()
             if node.data}
    assert names == {"cell probability": (30, 512, 512), "mask": (30, 512, 512), "cells": (30, 512, 512)}
    attrs = zarr.open_group(str(out), mode="r").attrs["segmentation"]
    assert attrs["model_key"] == summary["model_key"] and len(attrs["input_digest"]) == 64
    assert attrs["settings"]["tta"] == "none" and attrs["threshold"] == 0.5
    assert (out / "preview.png").stat().st_size > 10_000


@pytest.mark.ci_slice
def test_the_mindspore_backend_agrees_with_the_pipelines_onnxruntime_prediction(segment, smoke_work, isbi_dir,
                                                                                tmp_path):
    work, pipeline = smoke_work
    out = tmp_path / "ms.ome.zarr"
    summary = segment(isbi_dir / "test-volume.tif", out, work_dir=str(work), backend="mindspore")
    assert summary["backend"] == "mindspore"
    expected = tifffile.imread(Path(pipeline["stages"]["predict"]["output"]) / "test" / "probabilities.tif")
    got = arrays(out)
    diff = np.abs(got["prob"] - expected)
    print(f"max |mindspore - onnxruntime| = {diff.max():.2e}")
    assert diff.max() <= 1e-5
    # a mask pixel may only differ where the two probabilities straddle the threshold
    flipped = got["mask"] != np.where(expected >= 0.5, 255, 0)
    assert np.all(np.abs(expected[flipped] - 0.5) <= diff.max())


@pytest.mark.ci_slice
def test_a_rerun_is_a_no_op_and_other_settings_are_refused_unless_overwrite(segment, smoke_work, isbi_dir, tmp_path):
    from tasks.segment import OutputMismatch

    work = str(smoke_work[0])
    out = tmp_path / "again.ome.zarr"
    first = segment(isbi_dir / "test-volume.tif", out, work_dir=work)
    chunk = out / "0" / "c" / "3" / "0" / "0"
    written = chunk.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = segment(isbi_dir / "test-volume.tif", out, work_dir=work)
    print(f"rerun of a finished segmentation: {time.perf_counter() - t0:.1f} s")
    assert again == first and chunk.stat().st_mtime_ns == written
    with pytest.raises(OutputMismatch, match=r"another tta \(none, now flips\)"):
        segment(isbi_dir / "test-volume.tif", out, work_dir=work, tta="flips")
    assert chunk.stat().st_mtime_ns == written  # refused: nothing touched
    replaced = segment(isbi_dir / "test-volume.tif", out, work_dir=work, tta="flips", overwrite=True)
    assert replaced["settings"]["tta"] == "flips"
    assert zarr.open_group(str(out), mode="r").attrs["segmentation"]["settings"]["tta"] == "flips"


@pytest.mark.ci_slice
def test_blocks_on_frames_of_any_size_equal_whole_frames(segment, crop_model, isbi_dir, tmp_path):
    # 300 x 420: no multiple of 16 nor of the block; 128-pixel blocks -> 3 x 4 blocks per section
    stack = tifffile.imread(isbi_dir / "test-volume.tif")[:3, 50:350, 40:460]
    folder = frames_folder(tmp_path / "frames", stack)
    blocks = segment(folder, tmp_path / "blocks.ome.zarr", model=str(crop_model), block=128)
    whole = segment(folder, tmp_path / "whole.ome.zarr", model=str(crop_model))
    assert (blocks["blocks"], whole["blocks"]) == (36, 3)
    a, b = arrays(tmp_path / "blocks.ome.zarr"), arrays(tmp_path / "whole.ome.zarr")
    diff = float(np.abs(a["prob"] - b["prob"]).max())
    print(f"max |blocks of 128 - whole frames| = {diff:.2e}")
    assert diff <= 1e-5
    np.testing.assert_array_equal(a["mask"], b["mask"])
    # one id per cell across block edges, numbered as labelling the whole section numbers them
    np.testing.assert_array_equal(a["cells"], b["cells"])
    assert a["cells"].max() > 10


@pytest.mark.ci_slice
def test_tiff_format_writes_the_three_stacks(segment, smoke_work, isbi_dir, tmp_path):
    out = tmp_path / "tiffs"
    summary = segment(isbi_dir / "test-volume.tif", out, work_dir=str(smoke_work[0]), format="tiff")
    prob = tifffile.imread(out / "probabilities.tif")
    assert prob.shape == (30, 512, 512) and prob.dtype == np.float32 and 0 <= prob.min() and prob.max() <= 1
    expected = tifffile.imread(Path(smoke_work[1]["stages"]["predict"]["output"]) / "test" / "probabilities.tif")
    assert np.abs(prob - expected).max() <= 1e-5
    masks, cells = tifffile.imread(out / "masks.tif"), tifffile.imread(out / "cells.tif")
    assert masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 255}
    np.testing.assert_array_equal(masks, np.where(prob >= 0.5, 255, 0))
    assert cells.dtype == np.uint32 and int(sum(c.max() for c in cells)) == summary["cells"]["total"]
    assert not (out / ".segment" / "work.zarr").exists()  # the block store is gone once the TIFFs exist


@pytest.mark.ci_slice
def test_disk_full_marks_no_block_that_was_not_written(segment, crop_model, isbi_dir, tmp_path, monkeypatch):
    import unet.volume_io

    stack = tifffile.imread(isbi_dir / "test-volume.tif")[:2, :256, :256]
    folder = frames_folder(tmp_path / "frames", stack)
    reference = segment(folder, tmp_path / "ref.ome.zarr", model=str(crop_model), block=128)
    real = unet.volume_io.output_arrays
    writes = []

    class FullDisk:
        def __init__(self, array):
            self.array = array

        def __setitem__(self, where, value):
            writes.append(where)
            if len(writes) >= 3:  # the disk stays full
                raise OSError(errno.ENOSPC, "No space left on device")
            self.array[where] = value

    def failing(path, mode="r+"):
        found = real(path, mode)
        return {**found, "prob": FullDisk(found["prob"])}

    monkeypatch.setattr(unet.volume_io, "output_arrays", failing)
    out = tmp_path / "full.ome.zarr"
    with pytest.raises(OSError, match="No space left"):
        segment(folder, out, model=str(crop_model), block=128, blocks_per_task=1)
    marked = sorted(p.name for p in (out / ".segment" / "blocks").iterdir() if not p.name.startswith("."))
    assert len(marked) == 2  # the two blocks written before the third write failed, not the third
    monkeypatch.setattr(unet.volume_io, "output_arrays", real)
    resumed = segment(folder, out, model=str(crop_model), block=128)
    assert resumed["cells"] == reference["cells"]
    for key, value in arrays(out).items():
        np.testing.assert_array_equal(value, arrays(tmp_path / "ref.ome.zarr")[key])


# --- the command line ------------------------------------------------------------------------

def cli_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def cli(args: list[str], home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SEGMENT), *args], env=cli_env(home), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.ci_slice
def test_bad_inputs_get_one_error_line_and_write_nothing(smoke_work, isbi_dir, tmp_path):
    work = str(smoke_work[0])
    png = tmp_path / "frame.tif"
    cv2.imwrite(str(tmp_path / "frame.png"), np.zeros((64, 64), np.uint8))
    png.write_bytes((tmp_path / "frame.png").read_bytes())
    multichannel = tmp_path / "rgbish.zarr"
    zarr.open_array(str(multichannel), mode="w", shape=(2, 3, 128, 128), dtype="uint8")
    a_file = tmp_path / "out.txt"
    a_file.write_text("not a folder")
    cases = [
        ([str(png), "--work-dir", work], 1, "PNG"),
        ([str(multichannel), "--work-dir", work], 1, "multichannel"),
        ([str(tmp_path / "missing.tif"), "--work-dir", work], 1, "input not found"),
        ([str(isbi_dir / "test-volume.tif"), "--work-dir", work, "--output", str(a_file)], 1, "is a file"),
        ([str(isbi_dir / "test-volume.tif"), "--work-dir", str(tmp_path / "empty")], 1, "train one first (make run)"),
        ([str(isbi_dir / "test-volume.tif"), "--work-dir", work, "--block", "100"], 2, "argument --block: expected a multiple of 16"),
    ]
    for args, code, words in cases:
        done = cli(args, tmp_path / "home")
        lines = errors(done.stderr)
        assert done.returncode == code and len(lines) == 1 and words in lines[0], (args, done.stderr[-2000:])
    assert a_file.read_text() == "not a folder" and not (tmp_path / "empty").exists()
    assert not (Path(work) / "segmentations").exists()


def test_sigkill_mid_volume_then_the_same_command_finishes_bit_identical(segment, crop_model, isbi_dir, tmp_path):
    stack = tifffile.imread(isbi_dir / "test-volume.tif")[:6]
    source = tmp_path / "six.tif"
    tifffile.imwrite(source, stack, photometric="minisblack")
    reference = tmp_path / "ref.ome.zarr"
    segment(source, reference, model=str(crop_model), block=128)
    out = tmp_path / "killed.ome.zarr"
    args = [str(source), "--output", str(out), "--model", str(crop_model), "--block", "128", "--blocks-per-task", "2"]
    home = tmp_path / "home"
    proc = subprocess.Popen([sys.executable, str(SEGMENT), *args], env=cli_env(home), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    marks = out / ".segment" / "blocks"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if marks.is_dir() and len([p for p in marks.iterdir() if not p.name.startswith(".")]) >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its temporary server, as an OOM kill of the group would
    proc.wait()
    done_before = len([p for p in marks.iterdir() if not p.name.startswith(".")])
    assert 10 <= done_before < 96
    again = cli(args, home)
    assert again.returncode == 0, again.stderr[-3000:]
    logged = f"{done_before} of 96 blocks done, {96 - done_before} to go"
    assert logged in again.stdout + again.stderr
    for key, value in arrays(out).items():
        np.testing.assert_array_equal(value, arrays(reference)[key])


def train_only_modules() -> list[str]:
    """Import names of the ``train`` extra's packages (pyproject.toml), the project itself left out."""
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = [req.split("==")[0].split("[")[0].strip() for req in extras["train"]]
    return sorted(name.lower().replace("-", "_") for name in names if name != "unet-isbi")


@pytest.mark.ci_slice
def test_the_champion_export_segments_with_onnx_runtime_alone(segment, smoke_work, isbi_dir, tmp_path):
    """The pipeline exports its champion (ONNX, MindIR, model.json); segmenting with that folder
    needs none of the packages only training needs (the ``train`` extra of pyproject.toml: MindSpore,
    albumentations, pandas, onnx; their imports are blocked here, as a ``pip install .[infer]`` lacks
    them) and equals the checkpoint on ONNX Runtime."""
    work, pipeline = smoke_work
    export = Path(pipeline["outputs"]["champion_export"])
    record = json.loads((export / "model.json").read_text())
    champion = json.loads((work / "champion.json").read_text())
    assert record["train_key"] == champion["model"]["key"] and record["recipe"] == champion["recipe"]
    assert record["threshold"] == 0.5 and record["training_data"].startswith("datasets:")
    assert record["val"]["iou"] == pytest.approx(pipeline["metrics"]["val_native"]["iou"])
    assert {p.name for p in export.iterdir()} == {"model.onnx", "model.int8.onnx", "model.mindir", "model.json"}
    reference = tmp_path / "checkpoint.ome.zarr"
    segment(isbi_dir / "test-volume.tif", reference, work_dir=str(work))
    out = tmp_path / "export.ome.zarr"
    blocked = train_only_modules()
    assert {"mindspore", "albumentations", "pandas", "onnx"} <= set(blocked)
    code = (f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); from flows.segment_cli import main; "
            f"sys.exit(main([{str(isbi_dir / 'test-volume.tif')!r}, '--model', {str(export)!r}, "
            f"'--output', {str(out)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], env=cli_env(tmp_path / "home"), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for key, value in arrays(out).items():
        np.testing.assert_array_equal(value, arrays(reference)[key])


@pytest.mark.ci_slice
def test_export_cli_writes_a_folder_or_one_error_line(smoke_work, tmp_path):
    work = str(smoke_work[0])
    command = [sys.executable, str(REPO / "flows" / "export.py")]
    done = subprocess.run([*command, "--work-dir", work, "--out", str(tmp_path / "exp")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "segment with it" in done.stdout, done.stderr[-2000:]
    assert json.loads((tmp_path / "exp" / "model.json").read_text())["sha256"]["onnx"]
    missing = subprocess.run([*command, "--work-dir", str(tmp_path / "none"), "--out", str(tmp_path / "x")],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and errors(missing.stderr) == [missing.stderr.strip()]
    assert "train one first" in missing.stderr and not (tmp_path / "x").exists()


# --- int8 -------------------------------------------------------------------------------------

# int8 against fp32, the smoke champion on test frames 0, 15, 29 (measured 2026-12-02: max |diff|
# 0.297, mean 0.032, 99th percentile 0.124, 11.0 % of mask pixels flipped, correlation 0.889; its
# probabilities spread little around 0.5, std 0.092, so 8 bits cost it much: benchmarks/README.md).
INT8_MAX_DIFF = 0.4
INT8_MEAN_DIFF = 0.05
INT8_FLIPPED = 0.15
INT8_CORRELATION = 0.8


@pytest.mark.ci_slice
def test_int8_probabilities_are_close_to_fp32_on_real_frames(smoke_work, isbi_dir):
    """The champion export holds an int8 model calibrated on the model's 20 training frames; on
    real test frames its probabilities stay close to the float model's."""
    from unet.backends import load_exported
    from unet.blocks import Settings, predict_section
    from unet.recipes import Recipe

    export = Path(smoke_work[1]["outputs"]["champion_export"])
    record = json.loads((export / "model.json").read_text())
    assert record["files"]["onnx_int8"] == "model.int8.onnx" and (export / "model.int8.onnx").is_file()
    assert record["int8"]["calibration_frames"] == 20 and record["int8"]["format"] == "QDQ"
    settings = Settings(Recipe.from_dict(record["recipe"]))
    stack = tifffile.imread(isbi_dir / "test-volume.tif")[[0, 15, 29]]

    def predict(precision: str) -> np.ndarray:
        predictor = load_exported(export, precision)
        return np.stack([predict_section(predictor, lambda z, y0, y1, x0, x1: stack[z, y0:y1, x0:x1], stack.shape,
                                         z, settings) for z in range(len(stack))])

    fp32, int8 = predict("fp32"), predict("int8")
    diff = np.abs(int8 - fp32)
    flipped = np.mean((int8 >= 0.5) != (fp32 >= 0.5))
    print(f"int8 vs fp32 on 3 test frames: max |diff| {diff.max():.4f}, mean {diff.mean():.5f}, "
          f"mask pixels flipped {flipped:.5f}")
    assert fp32.std() > 0.05  # a real segmentation, not a constant map
    assert diff.max() <= INT8_MAX_DIFF and diff.mean() <= INT8_MEAN_DIFF and flipped <= INT8_FLIPPED
    assert np.corrcoef(fp32.ravel(), int8.ravel())[0, 1] >= INT8_CORRELATION


@pytest.mark.ci_slice
def test_segment_with_precision_int8_end_to_end(segment, smoke_work, isbi_dir, tmp_path):
    from tasks.segment import OutputMismatch

    work = str(smoke_work[0])
    stack = tifffile.imread(isbi_dir / "test-volume.tif")[:3, :256, :320]
    source = tmp_path / "tiny.tif"
    tifffile.imwrite(source, stack, photometric="minisblack")
    fp32 = segment(source, tmp_path / "fp32.ome.zarr", work_dir=work, precision="fp32")
    int8 = segment(source, tmp_path / "int8.ome.zarr", work_dir=work, precision="int8")
    assert (fp32["precision"], int8["precision"]) == ("fp32", "int8")
    assert int8["model_key"] != fp32["model_key"]  # another model file: its output is its own
    a, b = arrays(tmp_path / "fp32.ome.zarr"), arrays(tmp_path / "int8.ome.zarr")
    assert np.abs(a["prob"] - b["prob"]).max() <= INT8_MAX_DIFF
    assert np.mean(a["mask"] != b["mask"]) <= INT8_FLIPPED and b["cells"].max() > 10
    attrs = zarr.open_group(str(tmp_path / "int8.ome.zarr"), mode="r").attrs["segmentation"]
    assert attrs["checkpoint"].endswith("model.int8.onnx")
    with pytest.raises(OutputMismatch, match="another model"):  # fp32 into the int8 output
        segment(source, tmp_path / "int8.ome.zarr", work_dir=work, precision="fp32")


@pytest.mark.ci_slice
def test_the_int8_check_is_the_int8_models_val_scores_against_fp32s(smoke_work):
    """The export scores its int8 model on the val frames as segmentation runs it (block engine,
    the model's TTA, scales and shift) against the evaluate stage's fp32 val scores; the same path
    at fp32 gives the evaluate stage's scores, so the two are compared like for like."""
    from tasks.train import dataset_pairs
    from unet.backends import load_exported
    from unet.blocks import Settings, predict_array
    from unet.data import read_grey
    from unet.evaluate import KEPT_SCORES, native_scores, read_mask_frames
    from unet.recipes import Recipe

    work, pipeline = smoke_work
    export = Path(pipeline["outputs"]["champion_export"])
    record = json.loads((export / "model.json").read_text())
    check = record["int8"]["check"]
    val = pipeline["metrics"]["val_native"]
    folder = work / "datasets" / record["training_data"].split(":", 1)[1]
    pairs = dataset_pairs({"output": folder, **json.loads((folder / "manifest.json").read_text())["result"]}, "val")
    images = [image for image, _ in pairs]
    masks = read_mask_frames([mask for _, mask in pairs])
    assert check["frames"] == len(images) == 10
    settings = Settings(Recipe.from_dict(record["recipe"]), tta=record["tta"], scales=tuple(record["tta_scales"]),
                        shift=tuple(record["alignment_shift"]))

    def scores(precision: str) -> dict:
        predictor = load_exported(export, precision)
        return native_scores([predict_array(predictor, read_grey(image), settings) for image in images], masks)

    fp32, int8 = scores("fp32"), scores("int8")
    print("val fp32 (evaluate / block engine) vs int8:",
          {k: (round(val[k], 4), round(fp32[k], 4), round(int8[k], 4)) for k in KEPT_SCORES})
    for k in KEPT_SCORES:
        assert fp32[k] == pytest.approx(val[k], abs=1e-4) and check["reference"][k] == pytest.approx(val[k])
        assert check["val"][k] == pytest.approx(int8[k], abs=1e-9)
    assert check["val"] != check["reference"]  # int8 is another model: its scores move
    losses = {k: val[k] - int8[k] for k in KEPT_SCORES}
    assert check["keeps_scores"] == (max(losses.values()) < check["tolerance"] == 0.002)
    assert check["loss"]["value"] == pytest.approx(max(losses.values()))


@pytest.mark.ci_slice
def test_precision_auto_is_int8_only_where_the_check_kept_the_scores(smoke_work, crop_model, tmp_path):
    import shutil

    from tasks.segment import resolve_model

    work, pipeline = smoke_work
    export = tmp_path / "export"
    shutil.copytree(pipeline["outputs"]["champion_export"], export)
    record = json.loads((export / "model.json").read_text())
    for keeps, expected in ((True, "int8"), (False, "fp32")):
        record["int8"]["check"]["keeps_scores"] = keeps
        (export / "model.json").write_text(json.dumps(record))
        m = resolve_model(str(export), str(work), "auto")
        assert m["precision"] == expected and Path(m["onnx"]).name == f"model{'.int8' if keeps else ''}.onnx"
        assert m["precision_reason"].startswith(f"auto: int8 {'kept' if keeps else 'lost'}")
        assert resolve_model(str(export), str(work), "auto", backend="mindspore")["precision"] == "fp32"
    # the champion follows its export's check (the pipeline writes it), as the smoke model's own verdict
    champion_check = json.loads((Path(pipeline["outputs"]["champion_export"]) / "model.json").read_text())
    m = resolve_model("champion", str(work), "auto")
    assert m["precision"] == ("int8" if champion_check["int8"]["check"]["keeps_scores"] else "fp32")
    # a model without an export, or an export without a check, runs fp32
    m = resolve_model(str(crop_model), str(work), "auto")
    assert m["precision"] == "fp32" and "no checked int8 model" in m["precision_reason"]
    record["int8"]["check"] = None
    (export / "model.json").write_text(json.dumps(record))
    assert resolve_model(str(export), str(work), "auto")["precision"] == "fp32"


@pytest.mark.ci_slice
def test_the_champion_export_is_written_again_when_it_lacks_the_int8_check(smoke_work, tmp_path):
    """An export from before the check (or from an older evaluation) is not up to date: the
    pipeline's export step writes it again; one that is up to date is left as it is."""
    import shutil

    from prefect import flow

    from tasks.export import export_champion

    work, pipeline = smoke_work
    copy = tmp_path / "work"
    for name in ("evaluate", "champion-export"):
        shutil.copytree(work / name, copy / name)
    shutil.copy(work / "champion.json", copy / "champion.json")
    sidecar = copy / "champion-export" / "model.json"
    record = json.loads(sidecar.read_text())
    del record["int8"]["check"]
    sidecar.write_text(json.dumps(record))

    @flow
    def export_step() -> str:
        return export_champion(str(copy))

    export_step()
    again = json.loads(sidecar.read_text())
    assert again["int8"]["check"]["frames"] == 10 and again["exported"] >= record["exported"]
    for name in ("checkpoint", "onnx", "onnx_int8"):  # the same weights give the same models (MindIR
        assert again["sha256"][name] == record["sha256"][name]  # files differ from export to export)
    stamp = sidecar.stat().st_mtime_ns
    export_step()
    assert sidecar.stat().st_mtime_ns == stamp  # up to date: not written again


def test_bad_precisions_get_one_error_line(smoke_work, crop_model, isbi_dir, tmp_path):
    work = str(smoke_work[0])
    volume = str(isbi_dir / "test-volume.tif")
    cases = [
        ([volume, "--work-dir", work, "--precision", "fp16"], 2, "argument --precision: invalid choice: 'fp16'"),
        ([volume, "--work-dir", work, "--precision", "int8", "--backend", "mindspore"], 1,
         "precision int8 runs on onnxruntime, not mindspore"),
        ([volume, "--model", str(crop_model), "--precision", "int8"], 1, "int8 needs an export of this model"),
    ]
    for args, code, words in cases:
        done = cli(args, tmp_path / "home")
        lines = errors(done.stderr)
        assert done.returncode == code and len(lines) == 1 and words in lines[0], (args, done.stderr[-2000:])
    assert not (Path(work) / "segmentations").exists()
