"""Neighbouring sections as input channels (recipes with ``sections=3``), on a real ISBI split."""
from pathlib import Path

import numpy as np
import pytest
import tifffile

from unet.data import (SegmentationSource, read_grey, read_sections, section_paths, to_network_input,
                       train_transforms)
from unet.frames import extract_volumes
from unet.infer import load_model, predict_files, predict_frame
from unet.recipes import PRESETS, Recipe
from unet.split import read_split, split_dataset
from unet.train import train


@pytest.fixture(scope="module")
def split_dir(isbi_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real stacks extracted and split as the pipeline does (every third frame to val)."""
    root = tmp_path_factory.mktemp("sections")
    extract_volumes(isbi_dir / "train-volume.tif", isbi_dir / "train-labels.tif", isbi_dir / "test-volume.tif",
                    root / "frames")
    split_dataset(root / "frames", root / "split")
    return root / "split"


def _pairs(split_dir: Path, subset: str) -> list[tuple[Path, Path]]:
    table = read_split(split_dir)
    rows = table[table["subset"] == subset]
    return [(split_dir / r.image, split_dir / r.mask) for r in rows.itertuples()]


def test_neighbours_of_a_train_frame_are_the_train_stack_across_the_split(split_dir, isbi_dir):
    volume = tifffile.imread(isbi_dir / "train-volume.tif")
    # frame 1 is a train frame; 0 went to val, 2 to train: its neighbours cross the split
    paths = section_paths(split_dir / "train/image/00001.png", 3)
    assert [p.relative_to(split_dir).as_posix() for p in paths] == [
        "val/image/00000.png", "train/image/00001.png", "train/image/00002.png"]
    stack = read_sections(split_dir / "train/image/00001.png", 3)
    assert stack.shape == (512, 512, 3) and stack.dtype == np.uint8
    np.testing.assert_array_equal(stack.transpose(2, 0, 1), volume[0:3])


def test_stack_ends_repeat_the_nearest_frame_and_test_frames_stay_in_the_test_stack(split_dir, isbi_dir):
    test = tifffile.imread(isbi_dir / "test-volume.tif")
    first = read_sections(split_dir / "test_imgs/00000.png", 3)
    np.testing.assert_array_equal(first.transpose(2, 0, 1), test[[0, 0, 1]])
    last = read_sections(split_dir / "train/image/00029.png", 3)
    assert [p.name for p in section_paths(split_dir / "train/image/00029.png", 3)] == [
        "00028.png", "00029.png", "00029.png"]
    np.testing.assert_array_equal(last[..., 1], read_grey(split_dir / "train/image/00029.png"))


def test_one_section_is_the_grey_frame(split_dir):
    frame = split_dir / "val/image/00003.png"
    np.testing.assert_array_equal(read_sections(frame, 1), read_grey(frame))


def test_a_frame_outside_its_stack_is_a_clear_error(split_dir, tmp_path):
    with pytest.raises(ValueError, match="not found among the frames of its stack"):
        section_paths(split_dir / "train/image/99999.png", 3)


def test_a_neighbour_of_another_size_is_a_clear_error(split_dir, tmp_path):
    import cv2

    folder = tmp_path / "stack"
    folder.mkdir()
    frame = read_grey(split_dir / "val/image/00003.png")
    cv2.imwrite(str(folder / "00000.png"), frame)
    cv2.imwrite(str(folder / "00001.png"), frame[:256])
    with pytest.raises(ValueError, match="00000.png: its neighbouring sections differ in size"):
        read_sections(folder / "00000.png", 3)


def test_network_input_keeps_the_sections_as_channels(split_dir):
    stack = read_sections(split_dir / "val/image/00003.png", 3)
    x = to_network_input(stack, 3)
    assert x.shape == (3, 512, 512) and x.dtype == np.float32
    np.testing.assert_allclose(x[1], stack[..., 1] / 255.0)
    with pytest.raises(ValueError, match="expected 1 input channels"):
        to_network_input(stack, 1)


def test_augmentation_moves_the_sections_together(split_dir):
    """The training sample's middle channel is the 1-section sample of the same seed: every
    section gets the same crop, flip, warp and contrast."""
    fullres = PRESETS["fullres"]
    pairs = _pairs(split_dir, "train")[:3]
    one = SegmentationSource(pairs, train_transforms(fullres), 1, length=6, seed=3)
    three = SegmentationSource(pairs, train_transforms(fullres.replace(in_channels=3, sections=3)), 3,
                               length=6, seed=3, sections=3)
    for i in range(6):
        (x1, m1), (x3, m3) = one[i], three[i]
        assert x3.shape == (3, 256, 256)
        np.testing.assert_array_equal(x3[1], x1[0])
        np.testing.assert_array_equal(m3, m1)
        assert not np.array_equal(x3[0], x3[1])  # a different section, not the frame repeated


def test_recipe_checks_sections():
    with pytest.raises(ValueError, match="sections must be 1 or 3, got 2"):
        Recipe(name="x", sections=2)
    with pytest.raises(ValueError, match="sections 3 needs in_channels 3"):
        PRESETS["fullres"].replace(sections=3)


def test_the_flow_gives_a_three_section_recipe_three_input_channels():
    from flows.parameters import resolve_recipe

    recipe = resolve_recipe("fullres", sections=3)
    assert recipe["sections"] == 3 and recipe["in_channels"] == 3
    assert resolve_recipe("fullres")["in_channels"] == 1  # the preset as it is
    assert resolve_recipe("seed", sections=1)["in_channels"] == 3  # the case's grey frame read as 3 channels


@pytest.mark.slow  # trains (about 25 s)
def test_a_three_section_model_trains_and_predicts_real_frames(split_dir, tmp_path):
    recipe = Recipe(name="tiny3", in_channels=3, sections=3, base_channels=8, image_size=64, input_mode="crop",
                    augmentation="none", batch_size=2, val_batch_size=2, epochs=1, steps_per_epoch=2,
                    num_workers=1)
    result = train(recipe, _pairs(split_dir, "train")[:4], _pairs(split_dir, "val")[:2], tmp_path / "train")
    net = load_model(result.best_checkpoint, recipe)
    with pytest.raises(ValueError, match=r"expected \[H, W, 3\] sections, got shape \(512, 512\)"):
        predict_frame(net, read_grey(split_dir / "test_imgs/00004.png"), recipe)
    tests = [split_dir / "test_imgs/00004.png", split_dir / "test_imgs/00005.png"]
    out = predict_files(net, tests, recipe, tmp_path / "pred")
    assert out.cell_prob.shape == (2, 512, 512)
    # each frame was predicted from its own sections: the same as predicting that stack by hand
    np.testing.assert_allclose(out.cell_prob[1], predict_frame(net, read_sections(tests[1], 3), recipe), atol=1e-6)
    assert (out.overlays / "00005.png").is_file()

