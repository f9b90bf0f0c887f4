"""unet.volume_io: lazy volume readers (TIFF, folders of frames, Zarr, OME-Zarr) on the real ISBI stack
and small synthetic files, and the OME-Zarr / TIFF writers. Conversions must match the extract
stage's reader, unet.frames.read_volume, pixel for pixel."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import zarr

from unet.frames import read_volume
from unet.volume_io import (MIN_SIDE, content_digest, create_output, open_array, open_volume,
                            output_arrays, scan, write_tiff)

# ome_zarr.writer builds a deprecated Scaler as a default argument when it is imported
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated class Scaler:DeprecationWarning")


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _tiff(path: Path, array: np.ndarray, **kwargs) -> Path:
    """tifffile.imwrite, grey unless told otherwise ((3, H, W) would otherwise be planar RGB)."""
    kwargs.setdefault("photometric", "minisblack")
    tifffile.imwrite(path, array, **kwargs)
    return path


def _whole(volume) -> np.ndarray:
    return np.stack([volume.section(z) for z in range(volume.shape[0])])


# ---- the real ISBI stack ------------------------------------------------------------------------

def test_real_test_volume_reads_lazily_as_tifffile_does(isbi_dir):
    path = isbi_dir / "test-volume.tif"
    volume = open_volume(path)
    assert volume.kind == "tiff" and volume.shape == (30, 512, 512)
    assert volume.conversion == "none" and volume.colour == "grey"  # uint8 grey needs no scan
    stack = tifffile.imread(path)
    for z, y0, y1, x0, x1 in [(0, 0, 512, 0, 512), (7, 100, 228, 300, 512), (29, 511, 512, 0, 1)]:
        region = volume.read(z, y0, y1, x0, x1)
        assert region.dtype == np.uint8
        np.testing.assert_array_equal(region, stack[z, y0:y1, x0:x1])


def test_content_digest_is_stable_and_changes_with_one_byte(isbi_dir, tmp_path):
    original = isbi_dir / "test-volume.tif"
    digest = content_digest(open_volume(original))
    assert digest == content_digest(open_volume(original))
    copy = tmp_path / original.name
    shutil.copyfile(original, copy)
    assert content_digest(open_volume(copy)) == digest  # name and bytes, not the folder
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0xFF  # the last pixel of the last frame
    copy.write_bytes(bytes(data))
    assert content_digest(open_volume(copy)) != digest


# ---- conversions as the extract stage does them -------------------------------------------------

def test_uint16_needs_a_scan_then_scales_as_the_extract_stage(tmp_path):
    array = _rng().integers(0, 60001, (3, 128, 160)).astype(np.uint16)
    path = _tiff(tmp_path / "u16.tif", array)
    volume = open_volume(path)
    with pytest.raises(RuntimeError, match="scan"):
        volume.read(0, 0, 10, 0, 10)
    assert scan(volume) is volume and volume.conversion == "scale16"
    np.testing.assert_array_equal(_whole(volume), read_volume(path))
    again = open_volume(path, **volume.settings())  # the recorded settings need no second scan
    np.testing.assert_array_equal(again.read(2, 5, 50, 7, 99), read_volume(path)[2, 5:50, 7:99])


@pytest.mark.parametrize("kind, conversion", [("float01", "float01"), ("float255", "float255"),
                                              ("uint16 within 0..255", "cast"), ("bool", "bool")])
def test_other_pixel_types_convert_as_the_extract_stage(tmp_path, kind, conversion):
    values = _rng(1).random((3, 100, 120))
    array = {"float01": values.astype(np.float32),
             "float255": (values * 255).astype(np.float32),
             "uint16 within 0..255": (values * 255).astype(np.uint16),
             "bool": values > 0.5}[kind]
    path = _tiff(tmp_path / "frames.tif", array)
    volume = scan(open_volume(path))
    assert volume.conversion == conversion
    np.testing.assert_array_equal(_whole(volume), read_volume(path))


def test_float_with_nan_is_rejected_by_the_scan(tmp_path):
    array = _rng().random((2, 100, 100)).astype(np.float32)
    array[1, 50, 50] = np.nan
    volume = open_volume(_tiff(tmp_path / "nan.tif", array))
    with pytest.raises(ValueError, match="NaN"):
        scan(volume)


def test_negative_integers_are_rejected_by_the_scan(tmp_path):
    array = _rng().integers(-5, 300, (2, 100, 100)).astype(np.int16)
    with pytest.raises(ValueError, match="int16 pixels span -5"):
        scan(open_volume(_tiff(tmp_path / "i16.tif", array)))


def test_rgb_with_equal_channels_keeps_one(tmp_path):
    grey = _rng().integers(0, 256, (2, 128, 128), dtype=np.uint8)
    path = _tiff(tmp_path / "rgb.tif", np.repeat(grey[..., None], 3, axis=-1), photometric="rgb")
    volume = open_volume(path)
    assert volume.shape == (2, 128, 128) and volume.rgb
    with pytest.raises(RuntimeError, match="scan"):
        volume.section(0)
    assert scan(volume).colour == "equal"
    np.testing.assert_array_equal(_whole(volume), grey)


def test_rgb_with_different_channels_is_luminance_as_the_extract_stage(tmp_path):
    rgb = _rng().integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
    path = _tiff(tmp_path / "rgb.tif", rgb, photometric="rgb")
    volume = scan(open_volume(path))
    assert volume.colour == "luminance"
    np.testing.assert_array_equal(_whole(volume), read_volume(path))


def test_planar_rgb_tiff_reads_as_the_extract_stage(tmp_path):
    planes = _rng().integers(0, 256, (3, 128, 128), dtype=np.uint8)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, planes, photometric="rgb", planarconfig="separate")
    expected = read_volume(path)  # (1, 128, 128): one colour frame
    volume = scan(open_volume(path))
    assert volume.shape == expected.shape
    np.testing.assert_array_equal(_whole(volume), expected)


def test_single_page_tiff_is_one_section(tmp_path):
    frame = _rng().integers(0, 256, (100, 130), dtype=np.uint8)
    volume = open_volume(_tiff(tmp_path / "one.tif", frame))
    assert volume.shape == (1, 100, 130)
    np.testing.assert_array_equal(volume.read(0, 10, 90, 20, 130), frame[10:90, 20:130])


def test_tiled_compressed_tiff_regions(tmp_path):
    array = _rng().integers(0, 256, (2, 300, 260), dtype=np.uint8)
    volume = open_volume(_tiff(tmp_path / "tiled.tif", array, tile=(64, 64), compression="zlib"))
    np.testing.assert_array_equal(volume.read(1, 10, 200, 30, 250), array[1, 10:200, 30:250])


def test_tiff_with_pages_of_different_sizes_is_rejected(tmp_path):
    path = tmp_path / "mixed.tif"
    with tifffile.TiffWriter(path) as tif:
        for side in (128, 128, 96):
            tif.write(np.zeros((side, side), np.uint8), photometric="minisblack", metadata=None)
    with pytest.raises(ValueError):
        read_volume(path)
    with pytest.raises(ValueError):
        open_volume(path)


# ---- folders of frames --------------------------------------------------------------------------

def _frame_folder(folder: Path, frames: np.ndarray, names=None) -> Path:
    folder.mkdir()
    for i, frame in enumerate(frames):
        cv2.imwrite(str(folder / (names[i] if names else f"{i:03d}.png")), frame)
    return folder


def test_frame_folder_is_sorted_by_name_and_ignores_other_files(tmp_path):
    frames = _rng().integers(0, 256, (4, 96, 120), dtype=np.uint8)
    # written out of order; read back sorted by name: 000, 001, 002, 003
    folder = _frame_folder(tmp_path / "frames", frames[[2, 0, 3, 1]], ["002.png", "000.png", "003.png", "001.png"])
    (folder / "notes.txt").write_text("not a frame")
    (folder / ".hidden.png").write_bytes(b"")
    volume = open_volume(folder)
    assert volume.kind == "frames" and volume.shape == (4, 96, 120)
    np.testing.assert_array_equal(_whole(volume), frames)
    np.testing.assert_array_equal(volume.read(3, 5, 40, 60, 120), frames[3, 5:40, 60:120])


def test_frame_folder_with_a_frame_of_another_size_names_it(tmp_path):
    frames = list(_rng().integers(0, 256, (3, 96, 120), dtype=np.uint8))
    frames[2] = frames[2][:, :100]
    folder = _frame_folder(tmp_path / "frames", frames)
    with pytest.raises(ValueError, match="002.png"):
        open_volume(folder)


def test_empty_frame_folder_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no frames here")
    with pytest.raises(ValueError, match="no PNG or TIFF frames"):
        open_volume(tmp_path / "empty")


def test_frame_folder_with_mixed_bit_depths_reads_uint8_or_is_rejected(tmp_path):
    frames = _rng().integers(0, 256, (2, 96, 120), dtype=np.uint8)
    folder = _frame_folder(tmp_path / "frames", [frames[0], frames[1].astype(np.uint16) * 257])
    try:
        volume = scan(open_volume(folder))
        region = volume.read(1, 0, 10, 0, 10)
    except ValueError:
        return  # rejecting the folder is fine too
    assert region.dtype == np.uint8


# ---- Zarr and OME-Zarr --------------------------------------------------------------------------

def test_zarr_array_reads_regions(tmp_path):
    data = _rng().integers(0, 256, (4, 256, 256), dtype=np.uint8)
    array = zarr.open_array(str(tmp_path / "v.zarr"), mode="w", shape=data.shape, chunks=(1, 128, 128), dtype="uint8")
    array[:] = data
    volume = open_volume(tmp_path / "v.zarr")
    assert volume.kind == "zarr" and volume.shape == (4, 256, 256)
    np.testing.assert_array_equal(volume.read(2, 100, 200, 50, 256), data[2, 100:200, 50:256])
    np.testing.assert_array_equal(_whole(volume), data)


def test_2d_zarr_array_is_one_section(tmp_path):
    data = _rng().integers(0, 256, (100, 80), dtype=np.uint8)
    zarr.open_array(str(tmp_path / "v.zarr"), mode="w", shape=data.shape, chunks=(64, 64), dtype="uint8")[:] = data
    volume = open_volume(tmp_path / "v.zarr")
    assert volume.shape == (1, 100, 80)
    np.testing.assert_array_equal(volume.read(0, 10, 90, 5, 70), data[10:90, 5:70])


def _ome_image(path: Path, data: np.ndarray) -> Path:
    from ome_zarr.writer import write_image

    write_image(data, zarr.open_group(str(path), mode="w"), axes="tczyx", scale_factors=[])
    return path


def test_ome_zarr_image_drops_unit_time_and_channel_axes(tmp_path):
    data = _rng().integers(0, 256, (1, 1, 3, 128, 128), dtype=np.uint8)
    volume = open_volume(_ome_image(tmp_path / "image.ome.zarr", data))
    assert volume.shape == (3, 128, 128)
    np.testing.assert_array_equal(_whole(volume), data[0, 0])
    np.testing.assert_array_equal(volume.read(1, 3, 70, 60, 128), data[0, 0, 1, 3:70, 60:128])


def test_multichannel_ome_zarr_is_rejected(tmp_path):
    data = _rng().integers(0, 256, (1, 2, 3, 128, 128), dtype=np.uint8)
    with pytest.raises(ValueError, match="not a 4-D or multichannel volume"):
        open_volume(_ome_image(tmp_path / "image.ome.zarr", data))


def test_zarr_group_without_multiscales_is_rejected(tmp_path):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("0", shape=(2, 64, 64), dtype="uint8")
    with pytest.raises(ValueError, match="without OME-Zarr multiscales"):
        open_volume(tmp_path / "g.zarr")


def test_zarr_content_digest_covers_its_chunks(tmp_path):
    data = _rng().integers(0, 256, (2, 128, 128), dtype=np.uint8)
    array = zarr.open_array(str(tmp_path / "v.zarr"), mode="w", shape=data.shape, chunks=(1, 64, 64), dtype="uint8")
    array[:] = data
    digest = content_digest(open_volume(tmp_path / "v.zarr"))
    array[1, 100, 100] = data[1, 100, 100] ^ 1
    assert content_digest(open_volume(tmp_path / "v.zarr")) != digest


# ---- errors ---------------------------------------------------------------------------------------

def test_missing_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found"):
        open_volume(tmp_path / "nothing.tif")


def test_empty_file_is_rejected(tmp_path):
    (tmp_path / "x.tif").write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        open_volume(tmp_path / "x.tif")


def test_png_renamed_to_tif_is_named_as_png(tmp_path):
    cv2.imwrite(str(tmp_path / "frame.png"), np.zeros((100, 100), np.uint8))
    (tmp_path / "frame.png").rename(tmp_path / "frame.tif")
    with pytest.raises(ValueError, match="PNG"):
        open_volume(tmp_path / "frame.tif")


@pytest.mark.parametrize("shape", [(2, MIN_SIDE - 1, 100), (2, 100, 40)])
def test_frames_smaller_than_the_minimum_are_rejected(tmp_path, shape):
    path = _tiff(tmp_path / "small.tif", np.zeros(shape, np.uint8))
    with pytest.raises(ValueError, match=f"expected at least {MIN_SIDE}x{MIN_SIDE}"):
        open_volume(path)


def test_open_array_wraps_uint8_frames_only():
    frames = _rng().integers(0, 256, (2, 70, 80), dtype=np.uint8)
    np.testing.assert_array_equal(open_array(frames).read(1, 3, 9, 4, 80), frames[1, 3:9, 4:80])
    assert open_array(frames[0]).shape == (1, 70, 80)
    with pytest.raises(ValueError, match="uint8"):
        open_array(frames.astype(np.float32))


# ---- outputs --------------------------------------------------------------------------------------

def test_create_output_arrays_and_attributes_round_trip(tmp_path):
    path = tmp_path / "out.ome.zarr"
    attributes = {"recipe": "fullres", "halo": 144, "scales": [0.875, 1.0]}
    create_output(path, (2, 600, 700), (1, 512, 512), attributes)
    arrays = output_arrays(path)
    assert {k: (a.shape, a.chunks, str(a.dtype)) for k, a in arrays.items()} == {
        "prob": ((2, 600, 700), (1, 512, 512), "float32"),
        "mask": ((2, 600, 700), (1, 512, 512), "uint8"),
        "cells": ((2, 600, 700), (1, 512, 512), "uint32")}
    prob = _rng().random((600, 700)).astype(np.float32)
    cells = _rng(1).integers(0, 2**32, (600, 700), dtype=np.uint32)
    arrays["prob"][1] = prob
    arrays["mask"][0, 500:600, 600:700] = 255
    arrays["cells"][1] = cells
    again = output_arrays(path, mode="r")
    np.testing.assert_array_equal(again["prob"][1], prob)
    np.testing.assert_array_equal(again["cells"][1], cells)
    assert int(again["mask"][0].sum()) == 255 * 100 * 100 and not again["prob"][0].any()
    assert dict(zarr.open_group(str(path), mode="r").attrs)["segmentation"] == attributes


def test_create_output_lists_the_image_and_its_labels_in_ome_zarr_reader(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    path = tmp_path / "out.ome.zarr"
    create_output(path, (2, 600, 700), (1, 512, 512), {})
    cells = _rng().integers(0, 2**32, (600, 700), dtype=np.uint32)
    output_arrays(path)["cells"][1] = cells
    nodes = list(Reader(parse_url(str(path)))())
    by_name = {n.metadata.get("name"): n for n in nodes if n.data}
    assert set(by_name) == {"cell probability", "mask", "cells"}
    assert any(isinstance(s, Multiscales) for s in by_name["cell probability"].specs)
    for name in ("cell probability", "mask", "cells"):
        assert [tuple(d.shape) for d in by_name[name].data] == [(2, 600, 700)]
    assert all(any(isinstance(s, Label) for s in by_name[name].specs) for name in ("mask", "cells"))
    np.testing.assert_array_equal(np.asarray(by_name["cells"].data[0][1]), cells)


def test_write_tiff_streams_sections_into_place(tmp_path):
    data = _rng().random((3, 100, 120)).astype(np.float32)
    array = zarr.open_array(str(tmp_path / "p.zarr"), mode="w", shape=data.shape, chunks=(1, 64, 64), dtype="float32")
    array[:] = data
    out = tmp_path / "out" / "prob.tif"
    out.parent.mkdir()
    write_tiff(out, array, "float32")
    back = tifffile.imread(out)
    assert back.shape == (3, 100, 120) and back.dtype == np.float32
    np.testing.assert_array_equal(back, data)
    assert [p.name for p in out.parent.iterdir()] == ["prob.tif"]  # no temporary file left behind
