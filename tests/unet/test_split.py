"""unet.split: pairing frames by name, the 2:1 train/val assignment and the case's folder layout."""
from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from unet.frames import extract_volumes
from unet.split import (MODES, SPLIT_COLUMNS, assign_subsets, pair_by_stem, read_split,
                        split_dataset)


def _numbered_frames(root: Path, n: int, order_seed: int = 0, test: int = 2) -> Path:
    """images/, masks/, test/ whose pixels all equal the frame number, created in shuffled order."""
    for sub in ("images", "masks", "test"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    order = list(range(n))
    random.Random(order_seed).shuffle(order)
    for i in order:
        frame = np.full((16, 16), i, np.uint8)
        cv2.imwrite(str(root / "images" / f"{i:05d}.png"), frame)
        cv2.imwrite(str(root / "masks" / f"{i:05d}.png"), frame)  # same number as its image
    for i in range(test):
        cv2.imwrite(str(root / "test" / f"{i:05d}.png"), np.full((16, 16), 200 + i, np.uint8))
    return root


def _value(path: Path) -> int:
    """The single grey value of a numbered frame."""
    frame = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert frame is not None and frame.min() == frame.max()
    return int(frame[0, 0])


@pytest.fixture(scope="module")
def real_frames(isbi_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real ISBI stacks extracted once for this module."""
    out = tmp_path_factory.mktemp("isbi") / "frames"
    extract_volumes(isbi_dir / "train-volume.tif", isbi_dir / "train-labels.tif",
                    isbi_dir / "test-volume.tif", out)
    return out


# --- pairing ----------------------------------------------------------------------------------

def test_pairs_follow_names_not_listing_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frames = _numbered_frames(tmp_path, 12, order_seed=3)
    expected = pair_by_stem(frames / "images", frames / "masks")
    original_iterdir = Path.iterdir

    def shuffled_iterdir(self: Path):
        items = list(original_iterdir(self))
        random.Random(str(self)).shuffle(items)  # a different order per folder
        return iter(items)

    monkeypatch.setattr(Path, "iterdir", shuffled_iterdir)
    pairs = pair_by_stem(frames / "images", frames / "masks")
    assert pairs == expected
    assert [stem for stem, _, _ in pairs] == [f"{i:05d}" for i in range(12)]
    for stem, image, mask in pairs:
        assert _value(image) == _value(mask) == int(stem)


def test_unmatched_and_empty_folders(tmp_path: Path) -> None:
    frames = _numbered_frames(tmp_path, 8)
    (frames / "images" / "00003.png").unlink()
    for i in (20, 21, 22, 23, 24, 25):
        cv2.imwrite(str(frames / "images" / f"{i:05d}.png"), np.zeros((16, 16), np.uint8))
    with pytest.raises(ValueError) as err:
        pair_by_stem(frames / "images", frames / "masks")
    message = str(err.value)
    assert str(frames / "images") in message and str(frames / "masks") in message
    assert "only images 6 (00020, 00021, 00022, 00023, 00024, ...)" in message
    assert "only masks 1 (00003)" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .png frames"):
        pair_by_stem(empty, frames / "masks")
    with pytest.raises(FileNotFoundError, match="folder not found"):
        pair_by_stem(tmp_path / "missing", frames / "masks")


# --- assignment -------------------------------------------------------------------------------

def test_every_third() -> None:
    ids = [f"{i:05d}" for i in range(30)]
    subsets = assign_subsets(list(reversed(ids)))
    val = sorted(i for i, s in subsets.items() if s == "val")
    assert val == [f"{i:05d}" for i in range(0, 30, 3)]
    assert list(subsets.values()).count("train") == 20


def test_random_is_seeded_and_order_free() -> None:
    ids = [f"{i:05d}" for i in range(30)]
    first = assign_subsets(ids, mode="random", seed=4)
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    assert assign_subsets(shuffled, mode="random", seed=4) == first
    assert list(first.values()).count("val") == 10
    others = [assign_subsets(ids, mode="random", seed=s) for s in range(5, 9)]
    assert all(o != first for o in others)
    assert list(assign_subsets(ids[:4], mode="random").values()).count("val") == 1


def test_assignment_errors() -> None:
    with pytest.raises(ValueError) as err:
        assign_subsets(["a", "b"])
    assert str(err.value) == "need at least 3 labelled frames for a 2:1 train/val split, got 2"
    with pytest.raises(ValueError, match="every_third") as err:
        assign_subsets(["a", "b", "c"], mode="halves")
    assert all(mode in str(err.value) for mode in MODES)
    with pytest.raises(ValueError, match="unique"):
        assign_subsets(["a", "b", "b", "c"])


# --- layout -----------------------------------------------------------------------------------

def test_split_real_frames_every_third(real_frames: Path, tmp_path: Path) -> None:
    out = tmp_path / "split"
    table = split_dataset(real_frames, out)
    assert list(table.columns) == SPLIT_COLUMNS
    counts = table["subset"].value_counts().to_dict()
    assert counts == {"train": 20, "val": 10, "test": 30}
    val = table.loc[table["subset"] == "val", "frame_id"].tolist()
    assert val == [f"{i:05d}" for i in range(0, 30, 3)]
    assert table.equals(table.sort_values(["subset", "frame_id"]).reset_index(drop=True))
    for row in table.itertuples():
        assert (out / row.image).is_file()
        assert Path(row.image).name == f"{row.frame_id}.png"
        source = real_frames / ("test" if row.subset == "test" else "images") / f"{row.frame_id}.png"
        assert (out / row.image).read_bytes() == source.read_bytes()
        if row.subset == "test":
            assert row.mask == "" and row.image.startswith("test_imgs/")
        else:
            assert row.image.startswith(f"{row.subset}/image/")
            assert row.mask == f"{row.subset}/mask/{row.frame_id}.png"
            assert (out / row.mask).read_bytes() == (real_frames / "masks" / Path(row.mask).name).read_bytes()
    assert len(list((out / "train" / "image").iterdir())) == 20
    assert len(list((out / "val" / "mask").iterdir())) == 10
    assert len(list((out / "test_imgs").iterdir())) == 30
    back = read_split(out)
    pd.testing.assert_frame_equal(back, table, check_dtype=False)
    assert back["frame_id"].iloc[0].startswith("0000")


def test_split_pairs_stay_together_and_resplit_is_clean(tmp_path: Path) -> None:
    frames = _numbered_frames(tmp_path / "frames", 9, order_seed=7)
    out = tmp_path / "split"
    split_dataset(frames, out, mode="every_third")
    table = split_dataset(frames, out, mode="random", seed=2)  # over the previous split
    assert list(read_split(out)["frame_id"]) == list(table["frame_id"])
    for row in table[table["subset"] != "test"].itertuples():
        assert _value(out / row.image) == _value(out / row.mask) == int(row.frame_id)
    for subset in ("train", "val"):
        on_disk = sorted(p.stem for p in (out / subset / "image").iterdir())
        assert on_disk == sorted(table.loc[table["subset"] == subset, "frame_id"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left
    assert read_split(out).loc[lambda t: t["subset"] == "test", "mask"].tolist() == ["", ""]


def test_split_random_same_seed_same_files(tmp_path: Path) -> None:
    frames = _numbered_frames(tmp_path / "frames", 15)
    a = split_dataset(frames, tmp_path / "a", mode="random", seed=11)
    b = split_dataset(frames, tmp_path / "b", mode="random", seed=11)
    c = split_dataset(frames, tmp_path / "c", mode="random", seed=12)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


def test_split_errors(tmp_path: Path) -> None:
    frames = _numbered_frames(tmp_path / "frames", 2)
    with pytest.raises(ValueError, match="need at least 3 labelled frames"):
        split_dataset(frames, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="split.csv: file not found"):
        read_split(tmp_path)


def test_a_split_table_without_a_column_is_a_clear_error(tmp_path: Path) -> None:
    # e.g. a split.csv written by hand or by an older layout: name the file and the missing column
    # instead of a KeyError from pandas
    (tmp_path / "split.csv").write_text("frame_id,subset,image\n00000,val,val/image/00000.png\n")
    with pytest.raises(ValueError, match=r"split\.csv: missing columns \['mask'\], expected"):
        read_split(tmp_path)


def test_split_replaces_a_linked_or_stray_layout_entry_and_spares_what_a_link_points_to(tmp_path: Path) -> None:
    frames = _numbered_frames(tmp_path / "frames", 6)
    out = tmp_path / "new" / "nested" / "split"  # parents created too
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.png").write_bytes(b"not the split's")
    out.mkdir(parents=True)
    (out / "train").symlink_to(elsewhere, target_is_directory=True)  # e.g. a folder linked in by hand
    (out / "val").write_text("a stray file where a layout folder goes")
    table = split_dataset(frames, out)
    for subset in ("train", "val"):
        assert (out / subset).is_dir() and not (out / subset).is_symlink()
        on_disk = sorted(p.stem for p in (out / subset / "image").iterdir())
        assert on_disk == sorted(table.loc[table["subset"] == subset, "frame_id"])
    assert [p.name for p in elsewhere.iterdir()] == ["keep.png"]
    # the saved table is the documented four columns, nothing else (no pandas index)
    assert (out / "split.csv").read_text().splitlines()[0] == ",".join(SPLIT_COLUMNS)


def test_an_image_without_its_mask_alone_is_an_error_and_other_files_are_ignored(tmp_path: Path) -> None:
    frames = _numbered_frames(tmp_path, 6)
    (frames / "images" / "notes.txt").write_text("not a frame")
    (frames / "masks" / "Thumbs.db").write_bytes(b"\0")
    (frames / "masks" / "old.png").mkdir()  # a folder, not a frame
    assert [stem for stem, _, _ in pair_by_stem(frames / "images", frames / "masks")] == [
        f"{i:05d}" for i in range(6)]
    cv2.imwrite(str(frames / "images" / "00009.png"), np.zeros((16, 16), np.uint8))  # one side only
    with pytest.raises(ValueError, match=r"only images 1 \(00009\), only masks 0 \(\)"):
        pair_by_stem(frames / "images", frames / "masks")


def test_repeated_frame_ids_are_named() -> None:
    with pytest.raises(ValueError, match=r"repeated: \['b', 'd'\]$"):
        assign_subsets(["a", "b", "b", "c", "d", "d", "e"])


def test_a_split_of_one_volume_written_before_volumes_existed_reads_as_volume_0(tmp_path: Path) -> None:
    # split.csv of earlier runs has four columns: its labelled frames are one volume "0" and its
    # test frames the volume "test", each indexed in frame-name order
    (tmp_path / "split.csv").write_text(
        "frame_id,subset,image,mask\n"
        "00000,val,val/image/00000.png,val/mask/00000.png\n"
        "00002,train,train/image/00002.png,train/mask/00002.png\n"
        "00001,train,train/image/00001.png,train/mask/00001.png\n"
        "00001,test,test_imgs/00001.png,\n"
        "00000,test,test_imgs/00000.png,\n")
    table = read_split(tmp_path)
    assert list(table.columns) == SPLIT_COLUMNS
    assert table["volume"].tolist() == ["0", "0", "0", "test", "test"]
    assert table["index"].tolist() == ["0", "2", "1", "1", "0"]
    assert table["mask"].tolist()[3:] == ["", ""]


# --- found by mutation testing (benchmarks/mutation.py) -------------------------------------------

def test_without_frames_csv_labelled_frames_are_volume_0_and_test_frames_volume_test_in_name_order(tmp_path: Path):
    # frames laid out by hand (no extract stage's frames.csv): one volume "0"; the test frames are
    # volume "test"; each indexed in frame-name order (the module docstring)
    frames = _numbered_frames(tmp_path / "frames", 6, order_seed=5, test=3)
    table = split_dataset(frames, tmp_path / "split")
    labelled = table[table["subset"] != "test"].sort_values("frame_id")
    assert labelled["volume"].tolist() == ["0"] * 6 and labelled["index"].tolist() == [str(i) for i in range(6)]
    test = table[table["subset"] == "test"]
    assert test["volume"].tolist() == ["test"] * 3 and test["index"].tolist() == ["0", "1", "2"]
    pd.testing.assert_frame_equal(read_split(tmp_path / "split"), table)


def test_a_frames_csv_that_misses_a_frame_is_a_clear_error(tmp_path: Path) -> None:
    frames = _numbered_frames(tmp_path / "frames", 6, test=0)
    (frames / "frames.csv").write_text("frame,volume,index\n" + "".join(f"{i:05d},0,{i}\n" for i in (0, 1, 2, 4)))
    with pytest.raises(ValueError, match=r"frames\.csv: frames 2 \(00003, 00005\) are not listed$"):
        split_dataset(frames, tmp_path / "split")
    assert not (tmp_path / "split" / "split.csv").exists()


def test_a_read_split_of_several_volumes_keeps_each_frames_volume_and_index(tmp_path: Path) -> None:
    (tmp_path / "split.csv").write_text(
        "frame_id,subset,image,mask,volume,index\n"
        "v1-00004,val,val/image/v1-00004.png,val/mask/v1-00004.png,1,4\n"
        "v0-00002,train,train/image/v0-00002.png,train/mask/v0-00002.png,0,2\n"
        "00007,test,test_imgs/00007.png,,test,7\n")
    table = read_split(tmp_path)
    assert table["volume"].tolist() == ["1", "0", "test"] and table["index"].tolist() == ["4", "2", "7"]


def test_exactly_five_names_are_listed_without_an_ellipsis(tmp_path: Path) -> None:
    frames = _numbered_frames(tmp_path, 3)
    for i in range(20, 25):
        cv2.imwrite(str(frames / "images" / f"{i:05d}.png"), np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"only images 5 \(00020, 00021, 00022, 00023, 00024\), only masks 0"):
        pair_by_stem(frames / "images", frames / "masks")


def test_assign_by_volume_checks_like_assign_subsets_with_the_same_defaults() -> None:
    from unet.split import assign_by_volume

    with pytest.raises(ValueError) as err:
        assign_by_volume({"a": "0", "b": "0", "c": "1"}, mode="halves")
    assert str(err.value) == "unknown split mode 'halves'; expected one of ['every_third', 'random']"
    # three frames are enough, in one volume or two
    assert assign_by_volume({"a": "0", "b": "0", "c": "0"}) == {"a": "val", "b": "train", "c": "train"}
    assert assign_by_volume({"a": "0", "b": "0", "c": "1"}) == {"a": "val", "b": "train", "c": "val"}
    ids = [f"{i:05d}" for i in range(30)]
    assert assign_by_volume(dict.fromkeys(ids, "0"), "random") == assign_subsets(ids, "random")


def test_split_dataset_draws_with_seed_0_by_default(tmp_path: Path) -> None:
    frames = _numbered_frames(tmp_path / "frames", 12, test=0)
    table = split_dataset(frames, tmp_path / "split", mode="random")
    expected = assign_subsets([f"{i:05d}" for i in range(12)], "random", seed=0)
    assert dict(zip(table["frame_id"], table["subset"])) == expected


def test_the_split_is_built_in_a_hidden_folder_inside_out_dir_created_with_its_parents(tmp_path: Path,
                                                                                       monkeypatch) -> None:
    # inside out_dir: the finished layout is renamed into place on out's own file system (a
    # rename across file systems fails); hidden: a run killed mid-copy leaves no folder that looks
    # like part of the layout
    import unet.split as split

    frames = _numbered_frames(tmp_path / "frames", 6)
    out = tmp_path / "not" / "yet" / "split"
    copied, real = [], shutil.copy2
    monkeypatch.setattr(split.shutil, "copy2", lambda src, dst: copied.append(Path(dst)) or real(src, dst))
    split_dataset(frames, out)
    staging = {p.relative_to(out).parts[0] for p in copied}
    assert len(copied) == 6 + 6 + 2 and len(staging) == 1 and staging.pop().startswith(".split-")
    assert sorted(p.name for p in out.iterdir()) == ["split.csv", "test_imgs", "train", "val"]


def test_the_split_is_logged_with_its_mode_seed_and_counts_and_a_missing_test_volume(tmp_path: Path, caplog) -> None:
    # the run's log (Prefect shows it): where the split went, how, and how many frames each subset got
    caplog.set_level(logging.INFO, logger="unet.split")
    frames = _numbered_frames(tmp_path / "frames", 9, test=2)
    split_dataset(frames, tmp_path / "a", mode="random", seed=4)
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'a'}: split random (seed 4): {{'train': 6, 'val': 3, 'test': 2}}"]
    caplog.clear()
    for p in (frames / "test").iterdir():
        p.unlink()
    split_dataset(frames, tmp_path / "b")
    assert [r.getMessage() for r in caplog.records] == [
        f"{frames / 'test'}: no test frames (no test volume)",
        f"{tmp_path / 'b'}: split every_third (seed 0): {{'train': 6, 'val': 3}}"]


def test_a_failed_copy_reports_its_own_error_even_when_the_staging_folder_cannot_be_removed(tmp_path: Path,
                                                                                          monkeypatch) -> None:
    # a disk that fills up during the copy, and a staged file that will not go away (a busy file on a
    # network file system): the user sees the full disk, and the previous split stays as it was
    import errno
    import os

    import unet.split as split

    frames = _numbered_frames(tmp_path / "frames", 6)
    out = tmp_path / "split"
    before = split_dataset(frames, out)
    copies, real_copy, real_unlink = [], shutil.copy2, os.unlink

    def copy2(src, dst):
        copies.append(dst)
        if len(copies) == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_copy(src, dst)

    def unlink(path, *args, **kwargs):
        if os.path.basename(path) == "00000.png":
            raise PermissionError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(split.shutil, "copy2", copy2)
    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(OSError) as err:
        split_dataset(frames, out, mode="random", seed=3)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    pd.testing.assert_frame_equal(read_split(out), before)
