"""Bad input: one ``error:`` line on stderr, a non-zero exit code, no traceback, nothing written.

Every check runs in ``main()`` before the flow (a server launched meanwhile is stopped again:
tests/flows/test_temporary_server.py): most cases call
``main([...])`` in-process with the flow replaced by a stub that records whether it was reached;
a few run ``python flows/full_pipeline.py`` as a subprocess to check the real console output."""
from __future__ import annotations

import errno
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from robustness_support import SMOKE, make_data

import flows.cli as fp

ARGS_ERROR, FAILED = 2, 1


@pytest.fixture
def flow_stub(monkeypatch):
    """Replace the flow: record calls instead of starting Prefect."""
    calls = []

    def stub(**params):
        calls.append(params)
        return {}

    import flows.full_pipeline
    import flows.temporary_server
    import tasks.report

    monkeypatch.setattr(flows.full_pipeline, "full_pipeline", stub)
    # no early launch (as for a database still to migrate): the server starts after the checks
    monkeypatch.setattr(flows.temporary_server, "begin_temporary_server", lambda migrated_only=False: None)
    monkeypatch.setattr(flows.temporary_server, "start_temporary_server", lambda: calls.append("server"))
    monkeypatch.setattr(tasks.report, "format_console", lambda summary: "stub summary")
    return calls


def run_main(args: list[str], capsys) -> tuple[int, str]:
    code = fp.main(args)
    return code, capsys.readouterr().err


def assert_one_line(err: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def _png_bytes(frame: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", frame)
    assert ok
    return buf.tobytes()


def _jpeg_bytes(frame: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", frame)
    assert ok
    return buf.tobytes()


def _ids(labels: np.ndarray) -> np.ndarray:
    """Instance-id labels: every cell a different number (what a labelled segmentation looks like)."""
    from skimage.measure import label

    return np.stack([label(frame > 0, connectivity=1) for frame in labels[:3]]).astype(np.uint16)


# name -> (files for make_data, preset, which file the message names, message fragment)
def bad_data_cases(isbi: dict, isbi_dir: Path) -> dict:
    V, L, T = isbi["volume"], isbi["labels"], isbi["test"]
    real = (isbi_dir / "train-volume.tif").read_bytes()
    grey = L.copy()
    grey[:, :20, :20] = 128
    colour = np.stack([L, L, np.where(L > 0, 0, 255).astype(np.uint8)], axis=-1)
    floats = V.astype(np.float32)
    floats[0, 0, 0] = np.nan
    return {
        "missing_labels": ({"train_labels": None}, "smoke", "", "missing train-labels.tif"),
        "missing_test_volume": ({"test_volume": None}, "smoke", "", "missing test-volume.tif"),
        "empty_file": ({"train_volume": b""}, "smoke", "train-volume.tif", "empty file, 0 bytes"),
        "truncated_tiff": ({"train_volume": real[: len(real) // 2]}, "smoke", "train-volume.tif",
                           "truncated or corrupt"),
        "cut_after_header": ({"test_volume": real[:300]}, "smoke", "test-volume.tif", "not a readable TIFF stack"),
        "text_not_tiff": ({"train_labels": b"frame,label\n0,1\n"}, "smoke", "train-labels.tif",
                          "not a readable TIFF stack"),
        "png_renamed": ({"train_volume": _png_bytes(V[0])}, "smoke", "train-volume.tif", "a PNG image, not a TIFF"),
        "jpeg_renamed": ({"test_volume": _jpeg_bytes(T[0])}, "smoke", "test-volume.tif", "a JPEG image, not a TIFF"),
        "frame_count_differs": ({"train_labels": L[:29]}, "smoke", "train-labels.tif", "same frame count and size"),
        "frame_size_differs": ({"train_labels": np.ascontiguousarray(L[:, :, :500])}, "smoke", "train-labels.tif",
                               "(30, 512, 500)"),
        "grey_level_labels": ({"train_labels": grey}, "smoke", "train-labels.tif", "labels must be binary"),
        "instance_id_labels": ({"train_volume": V[:3], "train_labels": _ids(L)}, "smoke", "train-labels.tif",
                               "labels must be binary"),
        "colour_labels": ({"train_labels": colour}, "smoke", "train-labels.tif", "differing channels"),
        "float_with_nan": ({"train_volume": floats}, "smoke", "train-volume.tif", "NaN"),
        "float_out_of_range": ({"test_volume": T[:2].astype(np.float32) * 4 - 300}, "smoke", "test-volume.tif",
                               "expected values in [0, 1] or [0, 255]"),
        "negative_int16": ({"test_volume": T[:2].astype(np.int16) - 100}, "smoke", "test-volume.tif", "int16"),
        "two_labelled_frames": ({"train_volume": V[:2], "train_labels": L[:2]}, "smoke", "train-labels.tif",
                                "need at least 3 labelled frames"),
        "frames_8x8": ({"train_volume": np.ascontiguousarray(V[:, :8, :8]),
                        "train_labels": np.ascontiguousarray(L[:, :8, :8])}, "smoke", "train-volume.tif",
                       "expected at least 16x16"),
        "frames_smaller_than_crop": ({"train_volume": np.ascontiguousarray(V[:, :100, :100]),
                                      "train_labels": np.ascontiguousarray(L[:, :100, :100])}, "fullres",
                                     "train-volume.tif", "smaller than the 256px crops"),
    }


CASES = ["missing_labels", "missing_test_volume", "empty_file", "truncated_tiff", "cut_after_header",
         "text_not_tiff", "png_renamed", "jpeg_renamed", "frame_count_differs", "frame_size_differs",
         "grey_level_labels", "instance_id_labels", "colour_labels", "float_with_nan", "float_out_of_range",
         "negative_int16", "two_labelled_frames", "frames_8x8", "frames_smaller_than_crop"]


@pytest.mark.parametrize("case", CASES)
def test_bad_data_is_one_line_before_the_flow(case, isbi, isbi_dir, tmp_path, flow_stub, capsys):
    files, preset, named, fragment = bad_data_cases(isbi, isbi_dir)[case]
    data = make_data(tmp_path / "data", isbi_dir, **files)
    work = tmp_path / "work"
    code, err = run_main(["--data-dir", str(data), "--work-dir", str(work), "--preset", preset], capsys)
    assert code == FAILED
    line = assert_one_line(err, fragment)
    if named:
        assert str(data / named) in line
    assert not flow_stub, "the flow started"
    assert not work.exists(), "something was written"


def test_missing_and_misnamed_data_folders(tmp_path, flow_stub, capsys):
    code, err = run_main(["--data-dir", str(tmp_path / "nope"), "--work-dir", str(tmp_path / "w")], capsys)
    assert code == FAILED
    assert_one_line(err, str(tmp_path / "nope"), "data folder not found")
    (tmp_path / "file").write_text("x")
    code, err = run_main(["--data-dir", str(tmp_path / "file"), "--work-dir", str(tmp_path / "w")], capsys)
    assert code == FAILED
    assert_one_line(err, str(tmp_path / "file"), "not a folder")
    assert not flow_stub and not (tmp_path / "w").exists()


# Accepted with a conversion (the extract stage logs a note): the pre-check lets them through.
def accepted_cases(isbi: dict) -> dict:
    V, L, T = isbi["volume"][:6], isbi["labels"][:6], isbi["test"][:2]
    return {
        "uint16_volume": {"train_volume": V.astype(np.uint16) * 257},
        "float01_test_volume": {"test_volume": T.astype(np.float32) / 255},
        "float255_volume": {"train_volume": V.astype(np.float64)},
        "rgb_grey_volume": {"train_volume": np.repeat(V[..., None], 3, axis=-1)},
        "rgb_colour_test_volume": {"test_volume": np.stack([T, T // 2, 255 - T], axis=-1)},
        "labels_0_1": {"train_labels": (L > 0).astype(np.uint8)},
        "labels_bool": {"train_labels": L > 0},
        "labels_0_65535": {"train_labels": (L > 0).astype(np.uint16) * 65535},
        "labels_float_0_1": {"train_labels": (L > 0).astype(np.float32)},
    }


@pytest.mark.parametrize("case", ["uint16_volume", "float01_test_volume", "float255_volume", "rgb_grey_volume",
                                  "rgb_colour_test_volume", "labels_0_1", "labels_bool", "labels_0_65535",
                                  "labels_float_0_1"])
def test_convertible_stacks_pass_the_check(case, isbi, isbi_dir, tmp_path, flow_stub, capsys):
    files = accepted_cases(isbi)[case]
    V, L = isbi["volume"][:6], isbi["labels"][:6]
    files = {"train_volume": V, "train_labels": L, **files}
    data = make_data(tmp_path / "data", isbi_dir, **files)
    code, err = run_main(["--data-dir", str(data), "--work-dir", str(tmp_path / "w"), *SMOKE], capsys)
    assert (code, err) == (0, ""), err
    assert flow_stub[0] == "server" and len(flow_stub) == 2


# --- the work directory -----------------------------------------------------------------------

def test_work_dir_below_a_regular_file(isbi_dir, tmp_path, flow_stub, capsys):
    (tmp_path / "file").write_text("x")
    work = tmp_path / "file" / "work"
    code, err = run_main(["--data-dir", str(isbi_dir), "--work-dir", str(work), *SMOKE], capsys)
    assert code == FAILED
    assert_one_line(err, str(work), "work directory cannot be created", "Not a directory")
    assert not flow_stub


def test_work_dir_that_is_a_file(isbi_dir, tmp_path, flow_stub, capsys):
    (tmp_path / "work").write_text("x")
    code, err = run_main(["--data-dir", str(isbi_dir), "--work-dir", str(tmp_path / "work"), *SMOKE], capsys)
    assert code == FAILED
    assert_one_line(err, str(tmp_path / "work"), "exists and is not a folder")
    assert not flow_stub and (tmp_path / "work").read_text() == "x"


def test_work_dir_without_write_permission(isbi_dir, tmp_path, flow_stub, capsys, monkeypatch):
    """Tests run as root, where permissions do not stop writes: the write probe is made to fail as
    it would for a user on a read-only folder."""
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(kwargs.get("dir")))

    monkeypatch.setattr(fp.tempfile, "TemporaryFile", denied)
    work = tmp_path / "work"
    code, err = run_main(["--data-dir", str(isbi_dir), "--work-dir", str(work), *SMOKE], capsys)
    assert code == FAILED
    assert_one_line(err, str(work), "cannot be written to (Permission denied)")
    assert not flow_stub and list(work.iterdir()) == []


# --- invalid parameters -----------------------------------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["--epochs", "-3"], "argument --epochs: expected an integer >= 1, got '-3'"),
    (["--epochs", "0"], "argument --epochs"),
    (["--epochs", "two"], "argument --epochs"),
    (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got '0'"),
    (["--base-channels", "-8"], "argument --base-channels"),
    (["--learning-rate", "0"], "argument --learning-rate: expected a number > 0"),
    (["--learning-rate", "nan"], "argument --learning-rate"),
    (["--seed", "-1"], "argument --seed"),
    (["--preset", "bogus"], "argument --preset: invalid choice: 'bogus'"),
    (["--split", "alphabetical"], "argument --split: invalid choice"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
])
def test_invalid_parameters_exit_2(args, fragment, isbi_dir, tmp_path, flow_stub, capsys):
    code, err = run_main(["--data-dir", str(isbi_dir), "--work-dir", str(tmp_path / "w"), *args], capsys)
    assert code == ARGS_ERROR
    assert_one_line(err, fragment, "see --help")
    assert not flow_stub and not (tmp_path / "w").exists()


def test_recipe_validation_exits_2(isbi_dir, tmp_path, flow_stub, capsys, monkeypatch):
    """A value argparse lets through but the Recipe rejects (here: a stricter recipe rule)."""
    from unet.recipes import Recipe

    def reject(self, **changes):
        raise ValueError("epochs must be >= 1, got 0")

    monkeypatch.setattr(Recipe, "replace", reject)
    code, err = run_main(["--data-dir", str(isbi_dir), "--work-dir", str(tmp_path / "w"), *SMOKE], capsys)
    assert code == ARGS_ERROR
    assert_one_line(err, "epochs must be >= 1")
    assert not flow_stub


# --- the real command line --------------------------------------------------------------------

def _cli_cases(isbi: dict, isbi_dir: Path, tmp_path: Path) -> dict:
    grey = isbi["labels"][:6].copy()
    grey[:, :10, :10] = 7
    return {
        "missing_folder": (["--data-dir", str(tmp_path / "nowhere")], FAILED, "data folder not found"),
        "png_renamed": (["--data-dir", str(make_data(tmp_path / "png", isbi_dir,
                                                     train_volume=_png_bytes(isbi["volume"][0])))],
                        FAILED, "a PNG image, not a TIFF"),
        "grey_labels": (["--data-dir", str(make_data(tmp_path / "grey", isbi_dir, train_volume=isbi["volume"][:6],
                                                     train_labels=grey))],
                        FAILED, "found values [0, 7, 255]"),
        "negative_epochs": (["--data-dir", str(isbi_dir), "--epochs", "-1"], ARGS_ERROR, "--epochs"),
        "work_dir_under_file": (["--data-dir", str(isbi_dir), "--work-dir", str(tmp_path / "f" / "w")], FAILED,
                                "Not a directory"),
    }


@pytest.mark.parametrize("case", ["missing_folder", "png_renamed", "grey_labels", "negative_epochs",
                                  "work_dir_under_file"])
def test_cli_prints_one_line_and_starts_no_server(case, isbi, isbi_dir, tmp_path, pipeline):
    (tmp_path / "f").write_text("a file where a folder is expected")
    args, code, fragment = _cli_cases(isbi, isbi_dir, tmp_path)[case]
    if "--work-dir" not in args:
        args = [*args, "--work-dir", str(tmp_path / "work")]
    t0 = time.monotonic()
    done = pipeline.run([*args, *SMOKE], timeout=120)
    seconds = time.monotonic() - t0
    assert done.returncode == code, done.stderr
    assert_one_line(done.stderr, fragment)
    assert done.stdout == ""
    assert not (tmp_path / "work").exists()
    assert seconds < 30, f"{seconds:.0f} s: the error should come before Prefect's server starts"


def test_debug_shows_the_traceback(isbi, isbi_dir, tmp_path, flow_stub, capsys):
    data = make_data(tmp_path / "data", isbi_dir, train_volume=b"")
    with pytest.raises(ValueError, match="empty file"):
        fp.main(["--data-dir", str(data), "--work-dir", str(tmp_path / "w"), "--debug", *SMOKE])


@pytest.mark.parametrize("flag, expected", [([], None), (["--register-labels"], True),
                                            (["--no-register-labels"], False)])
def test_register_labels_flag_reaches_the_flow(flag, expected, isbi_dir, tmp_path, flow_stub, capsys):
    code, _ = run_main(["--data-dir", str(isbi_dir), "--work-dir", str(tmp_path / "w"), *SMOKE, *flag], capsys)
    assert code == 0
    assert flow_stub[-1]["register_labels"] is expected  # None: the preset's own setting


@pytest.mark.parametrize("flag, expected", [([], None), (["--image-size", "96"], 96)])
def test_image_size_flag_reaches_the_flow(flag, expected, isbi_dir, tmp_path, flow_stub, capsys):
    code, _ = run_main(["--data-dir", str(isbi_dir), "--work-dir", str(tmp_path / "w"), *SMOKE, *flag], capsys)
    assert code == 0
    assert flow_stub[-1]["image_size"] == expected  # None: the preset's own size


# 100 is no valid size for any data (the recipe rejects it: an invalid argument, 2); 1024 is valid
# but larger than these 512x512 frames (the input check rejects it against the data: 1).
@pytest.mark.parametrize("size, message, expected", [("100", "multiple of 16", ARGS_ERROR),
                                                     ("1024", "smaller --image-size", FAILED)])
def test_bad_image_size_is_one_line(size, message, expected, isbi_dir, tmp_path, capsys):
    code, err = run_main(["--data-dir", str(isbi_dir), "--work-dir", str(tmp_path / "w"), "--preset", "fullres",
                          "--image-size", size], capsys)
    assert code == expected
    assert_one_line(err, message)
    assert not (tmp_path / "w").exists()  # nothing written


@pytest.mark.parametrize("flag, expected", [([], None), (["--sections", "3"], 3), (["--sections", "1"], 1)])
def test_sections_flag_reaches_the_flow(flag, expected, isbi_dir, tmp_path, flow_stub, capsys):
    code, _ = run_main(["--data-dir", str(isbi_dir), "--work-dir", str(tmp_path / "w"), *SMOKE, *flag], capsys)
    assert code == 0
    assert flow_stub[-1]["sections"] == expected  # None: the preset's own setting


def test_bad_sections_is_one_line(isbi_dir, tmp_path, flow_stub, capsys):
    code, err = run_main(["--data-dir", str(isbi_dir), "--work-dir", str(tmp_path / "w"), *SMOKE,
                          "--sections", "2"], capsys)
    assert code == ARGS_ERROR
    assert_one_line(err, "argument --sections: invalid choice: 2")
    assert not flow_stub and not (tmp_path / "w").exists()


@pytest.mark.parametrize("flag, expected", [([], None), (["--tta-scales", "0.875", "1", "1.125"], [0.875, 1.0, 1.125])])
def test_tta_scales_flag_reaches_the_flow(flag, expected, isbi_dir, tmp_path, flow_stub, capsys):
    code, _ = run_main(["--data-dir", str(isbi_dir), "--work-dir", str(tmp_path / "w"), *SMOKE, *flag], capsys)
    assert code == 0
    assert flow_stub[-1]["tta_scales"] == expected  # None: the preset's own scales


@pytest.mark.parametrize("scales, fragment", [(["0"], "argument --tta-scales"),
                                              (["1", "8"], "tta_scales must be between 0.25 and 4, got [1.0, 8.0]")])
def test_bad_tta_scales_are_one_line(scales, fragment, isbi_dir, tmp_path, flow_stub, capsys):
    code, err = run_main(["--data-dir", str(isbi_dir), "--work-dir", str(tmp_path / "w"), *SMOKE,
                          "--tta-scales", *scales], capsys)
    assert code == ARGS_ERROR
    assert_one_line(err, fragment)
    assert not flow_stub and not (tmp_path / "w").exists()


def test_presets_test_time_scales():
    from flows.parameters import resolve_scales

    assert resolve_scales("fullres") == [0.875, 1.0, 1.125]
    assert resolve_scales("seed") == [1.0] and resolve_scales("smoke") == [1.0]
    assert resolve_scales("fullres", [1.0]) == [1.0]  # given scales win
