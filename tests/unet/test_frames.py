"""unet.frames: reading TIFF stacks (real ISBI volumes and synthetic edge cases) and writing frames."""
from __future__ import annotations

import logging
import random
import struct
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from unet.frames import (MIN_FRAME_SIDE, check_pair, extract_volumes, read_labels, read_volume,
                         write_frames)

RNG_SEED = 0


def _stack(n: int = 4, h: int = 32, w: int = 48, seed: int = RNG_SEED) -> np.ndarray:
    """A small random uint8 stack."""
    return np.random.default_rng(seed).integers(0, 256, (n, h, w), dtype=np.uint8)


def _write(path: Path, array: np.ndarray, **kwargs) -> Path:
    """tifffile.imwrite, always grey unless told otherwise ((3, H, W) would become planar RGB)."""
    kwargs.setdefault("photometric", "rgb" if array.ndim >= 3 and array.shape[-1] in (3, 4)
                      else "minisblack")
    tifffile.imwrite(path, array, **kwargs)
    return path


def _pages(path: Path, frames: np.ndarray) -> Path:
    """One page per frame, no tifffile shape metadata (like ImageJ / the ISBI files)."""
    with tifffile.TiffWriter(path) as tif:
        for frame in frames:
            tif.write(frame, photometric="minisblack", metadata=None, contiguous=False)
    return path


# --- real data --------------------------------------------------------------------------------

def test_extract_volumes_round_trip(isbi_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "frames"
    info = extract_volumes(isbi_dir / "train-volume.tif", isbi_dir / "train-labels.tif",
                           isbi_dir / "test-volume.tif", out)
    assert info["train_frames"] == 30 and info["test_frames"] == 30
    assert info["frame_shape"] == [512, 512]
    expected_names = [f"{i:05d}.png" for i in range(30)]
    for sub, source in (("images", "train-volume.tif"), ("masks", "train-labels.tif"),
                        ("test", "test-volume.tif")):
        names = sorted(p.name for p in (out / sub).iterdir())
        assert names == expected_names, sub
        original = tifffile.imread(isbi_dir / source)
        back = np.stack([cv2.imread(str(out / sub / n), cv2.IMREAD_UNCHANGED) for n in names])
        assert back.dtype == np.uint8 and back.shape == (30, 512, 512)
        np.testing.assert_array_equal(back, original)


def test_read_real_volume_and_labels(isbi_dir: Path) -> None:
    volume = read_volume(isbi_dir / "train-volume.tif")
    labels = read_labels(isbi_dir / "train-labels.tif")
    assert volume.shape == labels.shape == (30, 512, 512)
    assert volume.dtype == labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, tifffile.imread(isbi_dir / "train-labels.tif"))
    assert set(np.unique(labels).tolist()) == {0, 255}


# --- pixel types and layouts ------------------------------------------------------------------

def test_uint16_scaled_with_note(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = np.array([0, 257, 32767, 65535], dtype=np.uint16)
    stack = np.tile(data, (2, 32, 8))  # (2, 32, 32)
    path = _write(tmp_path / "u16.tif", stack)
    with caplog.at_level(logging.WARNING, logger="unet.frames"):
        out = read_volume(path)
    assert out.dtype == np.uint8 and out.shape == (2, 32, 32)
    np.testing.assert_array_equal(out[0, 0, :4], [0, 1, 127, 255])
    assert any(str(path) in r.getMessage() and "uint16" in r.getMessage() for r in caplog.records)


def test_uint16_within_8_bit_range_is_cast(tmp_path: Path) -> None:
    stack = _stack().astype(np.uint16)
    np.testing.assert_array_equal(read_volume(_write(tmp_path / "u16.tif", stack)), _stack())


def test_single_page_is_one_frame(tmp_path: Path) -> None:
    frame = _stack(1)[0]
    out = read_volume(_write(tmp_path / "one.tif", frame))
    assert out.shape == (1, *frame.shape)
    np.testing.assert_array_equal(out[0], frame)


def test_page_per_frame_file(tmp_path: Path) -> None:
    stack = _stack(5)
    np.testing.assert_array_equal(read_volume(_pages(tmp_path / "pages.tif", stack)), stack)


def test_zlib_compressed_reads_equal(isbi_dir: Path, tmp_path: Path) -> None:
    stack = tifffile.imread(isbi_dir / "train-volume.tif")[:3]
    path = _write(tmp_path / "zlib.tif", stack, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].compression == 8  # really compressed
    np.testing.assert_array_equal(read_volume(path), stack)


def test_rgb_with_equal_channels_is_grey(tmp_path: Path) -> None:
    grey = _stack(3)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    np.testing.assert_array_equal(read_volume(_write(tmp_path / "rgb.tif", rgb)), grey)
    rgba = np.concatenate([rgb, np.full_like(grey[..., None], 255)], axis=-1)
    np.testing.assert_array_equal(read_volume(_write(tmp_path / "rgba.tif", rgba)), grey)
    single = read_volume(_write(tmp_path / "rgb1.tif", rgb[0]))
    np.testing.assert_array_equal(single, grey[:1])


def test_rgb_with_colour_uses_luminance(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    path = _write(tmp_path / "colour.tif", rgb)
    with caplog.at_level(logging.WARNING, logger="unet.frames"):
        out = read_volume(path)
    expected = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in rgb])
    np.testing.assert_array_equal(out, expected)
    assert any("luminance" in r.getMessage() for r in caplog.records)


def test_planar_rgb_is_read_as_colour(tmp_path: Path) -> None:
    grey = _stack(1)[0]
    planar = np.stack([grey, grey, grey])  # (3, H, W) with photometric rgb, planar
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, planar, photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_volume(path), grey[None])


def test_float_volumes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    grey = _stack()
    unit = _write(tmp_path / "unit.tif", grey.astype(np.float32) / 255)
    with caplog.at_level(logging.WARNING, logger="unet.frames"):
        np.testing.assert_array_equal(read_volume(unit), grey)
    assert any(str(unit) in r.getMessage() for r in caplog.records)
    byte_range = _write(tmp_path / "bytes.tif", grey.astype(np.float64))
    np.testing.assert_array_equal(read_volume(byte_range), grey)
    for name, bad in (("neg.tif", grey.astype(np.float32) - 10), ("big.tif", grey * 300.0),
                      ("nan.tif", np.where(grey > 128, np.nan, 0.5).astype(np.float32))):
        with pytest.raises(ValueError, match=r"\[0, 1\]") as err:
            read_volume(_write(tmp_path / name, bad))
        assert str(tmp_path / name) in str(err.value)


def test_one_bit_and_wide_integers(tmp_path: Path) -> None:
    mask = _stack() > 100
    out = read_volume(_write(tmp_path / "bits.tif", mask))
    np.testing.assert_array_equal(out, mask.astype(np.uint8) * 255)
    wide = _write(tmp_path / "i32.tif", _stack().astype(np.int32) * 1000)
    with pytest.raises(ValueError, match="int32") as err:
        read_volume(wide)
    assert str(wide) in str(err.value)


def test_unsupported_layouts(tmp_path: Path) -> None:
    four_d = _write(tmp_path / "4d.tif", np.zeros((2, 2, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="layout") as err:
        read_volume(four_d)
    assert str(four_d) in str(err.value)
    tiny = _write(tmp_path / "tiny.tif", np.zeros((2, MIN_FRAME_SIDE - 1, 64), np.uint8))
    with pytest.raises(ValueError, match=f"{MIN_FRAME_SIDE - 1}x64") as err:
        read_volume(tiny)
    assert str(tiny) in str(err.value)


def test_pages_of_different_sizes_rejected(tmp_path: Path) -> None:
    path = tmp_path / "mixed.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.zeros((32, 32), np.uint8), metadata=None)
        tif.write(np.zeros((48, 32), np.uint8), metadata=None)
    with pytest.raises(ValueError, match="series") as err:
        read_volume(path)
    assert str(path) in str(err.value)


# --- labels -----------------------------------------------------------------------------------

def test_labels_zero_one_normalised(tmp_path: Path) -> None:
    binary = (_stack() > 128).astype(np.uint8)
    out = read_labels(_write(tmp_path / "01.tif", binary))
    np.testing.assert_array_equal(out, binary * 255)
    for value in (0, 1, 255):
        flat = read_labels(_write(tmp_path / f"all{value}.tif", np.full((2, 32, 32), value, np.uint8)))
        assert set(np.unique(flat).tolist()) == {0 if value == 0 else 255}
    bits = read_labels(_write(tmp_path / "bits.tif", binary.astype(bool)))
    np.testing.assert_array_equal(bits, binary * 255)


def test_grey_level_labels_rejected(isbi_dir: Path, tmp_path: Path) -> None:
    grey = _write(tmp_path / "grey-labels.tif", tifffile.imread(isbi_dir / "train-volume.tif")[:2])
    with pytest.raises(ValueError, match=r"binary \(0/255 or 0/1\), found values \[") as err:
        read_labels(grey)
    message = str(err.value)
    assert str(grey) in message and "..." in message and "distinct" in message


def test_instance_id_labels_rejected(tmp_path: Path) -> None:
    ids = np.zeros((2, 32, 32), np.uint16)
    for k, value in enumerate((3, 7, 12)):
        ids[:, k * 8:(k + 1) * 8, :8] = value
    path = _write(tmp_path / "instances.tif", ids)
    with pytest.raises(ValueError) as err:
        read_labels(path)
    assert str(path) in str(err.value)
    assert "found values [0, 3, 7, 12]" in str(err.value)


# --- unreadable files -------------------------------------------------------------------------

def _bad_files(tmp_path: Path, isbi_dir: Path) -> dict[str, Path]:
    """Files that are not readable TIFF stacks, by case name."""
    real = (isbi_dir / "train-volume.tif").read_bytes()
    paged = _pages(tmp_path / "paged.tif", _stack(5)).read_bytes()
    with tifffile.TiffFile(tmp_path / "paged.tif") as tif:
        third_page = tif.pages[2].offset
    cases = {
        "empty": b"",
        "truncated": real[: len(real) // 2],
        "cut_at_page": paged[:third_page],  # tifffile alone would return 2 frames silently
        "text": b"frame,value\n0,1\n",
        "three_bytes": b"II*",  # struct.error inside tifffile
        "header_only": b"II*\x00\x00\x00\x00\x00",  # no pages at all
        "circular": _circular_ifd(paged),
    }
    paths = {}
    for name, data in cases.items():
        paths[name] = tmp_path / f"{name}.tif"
        paths[name].write_bytes(data)
    ok, png = cv2.imencode(".png", _stack(1)[0])
    paths["png_renamed"] = tmp_path / "frame.tif"
    paths["png_renamed"].write_bytes(png.tobytes())
    return paths


def _circular_ifd(data: bytes) -> bytes:
    """A page chain pointing back into the first IFD plus a bad tag type: tifffile.imread loops
    forever on this (found by fuzzing tifffile 2026.3.3); it must be rejected, not hang."""
    data = bytearray(data)
    first = struct.unpack("<I", data[4:8])[0]
    n_tags = struct.unpack("<H", data[first:first + 2])[0]
    data[first + 2 + 12 + 2:first + 2 + 12 + 4] = struct.pack("<H", 206)  # ImageLength type
    at = first + 2 + 12 * n_tags
    data[at:at + 4] = struct.pack("<I", 16)  # next IFD inside the first one
    return bytes(data)


def _error_within(reader, path: Path, seconds: float = 10.0) -> BaseException | None:
    """Run ``reader(path)`` in a daemon thread; its exception, or fail if it hangs or returns."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            reader(path)
            outcome.append(None)
        except BaseException as exc:  # handed back to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if not outcome:
        pytest.fail(f"{reader.__name__}({path.name}) did not return within {seconds} s")
    return outcome[0]


@pytest.mark.parametrize("case", ["empty", "truncated", "cut_at_page", "text", "three_bytes",
                                  "header_only", "circular", "png_renamed"])
def test_unreadable_files_raise_value_error(case: str, isbi_dir: Path, tmp_path: Path) -> None:
    path = _bad_files(tmp_path, isbi_dir)[case]
    for reader in (read_volume, read_labels):
        error = _error_within(reader, path)
        assert isinstance(error, ValueError), f"{case}: {error!r}"
        message = str(error)
        assert str(path) in message and "not a readable TIFF stack" in message
        assert "\n" not in message


def test_missing_file_and_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope.tif"
    with pytest.raises(FileNotFoundError) as err:
        read_volume(missing)
    assert str(err.value) == f"{missing}: file not found"
    with pytest.raises(ValueError) as err:
        read_labels(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_corrupted_bytes_never_escape_as_other_errors(tmp_path: Path) -> None:
    sources = [_write(tmp_path / "a.tif", _stack(3, 40, 40)).read_bytes(),
               _write(tmp_path / "z.tif", _stack(3, 40, 40), compression="zlib").read_bytes(),
               _pages(tmp_path / "p.tif", _stack(3, 40, 40)).read_bytes()]
    rng = random.Random(RNG_SEED)
    path = tmp_path / "fuzz.tif"
    for _ in range(300):
        data = bytearray(rng.choice(sources))
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(min(len(data), 600))] = rng.randrange(256)
        if rng.random() < 0.2:
            data = data[: rng.randrange(len(data))]
        path.write_bytes(bytes(data))
        try:
            out = read_volume(path)
        except ValueError as exc:
            assert str(path) in str(exc)
        else:
            assert out.dtype == np.uint8 and out.ndim == 3


# --- pairs and writing ------------------------------------------------------------------------

def test_check_pair_mismatches() -> None:
    volume = np.zeros((30, 64, 64), np.uint8)
    check_pair(volume, volume.copy(), "v.tif", "l.tif")
    with pytest.raises(ValueError, match=r"v\.tif.*\(30, 64, 64\).*l\.tif.*\(29, 64, 64\)"):
        check_pair(volume, volume[:29], "v.tif", "l.tif")
    with pytest.raises(ValueError, match=r"\(30, 64, 48\)"):
        check_pair(volume, volume[:, :, :48], "v.tif", "l.tif")


def test_extract_validates_before_writing(tmp_path: Path) -> None:
    volume = _write(tmp_path / "v.tif", _stack(4))
    labels = _write(tmp_path / "l.tif", (_stack(3) > 128).astype(np.uint8) * 255)
    out = tmp_path / "frames"
    with pytest.raises(ValueError, match="frame count") as err:
        extract_volumes(volume, labels, volume, out)
    assert str(volume) in str(err.value) and str(labels) in str(err.value)
    assert not out.exists()
    good_labels = _write(tmp_path / "l4.tif", (_stack(4) > 128).astype(np.uint8))
    with pytest.raises(FileNotFoundError):
        extract_volumes(volume, good_labels, tmp_path / "missing.tif", out)
    assert not out.exists()


def test_write_frames_names_and_stale_frames(tmp_path: Path) -> None:
    out = tmp_path / "frames"
    paths = write_frames(_stack(12), out)
    assert [p.name for p in paths] == [f"{i:05d}.png" for i in range(12)]
    (out / "notes.txt").write_text("kept")
    paths = write_frames(_stack(3, seed=5), out)
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    assert (out / "notes.txt").exists()
    np.testing.assert_array_equal(cv2.imread(str(paths[2]), cv2.IMREAD_UNCHANGED), _stack(3, seed=5)[2])
    assert not list(out.glob(".*"))  # no temporary files left
    with pytest.raises(ValueError, match="uint8"):
        write_frames(np.zeros((2, 32, 32), np.float32), out)
