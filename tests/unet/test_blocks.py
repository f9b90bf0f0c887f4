"""unet.blocks: the block engine with fake predictors (no MindSpore) and tile-by-tile cell labelling.

A fake predictor stands in for the network: its output at a pixel depends only on the input within
a known radius, so block-wise inference with a halo of at least that radius must equal whole-frame
inference exactly (up to float rounding), and without one it must not.
"""
from __future__ import annotations

import math
import subprocess
import sys

import cv2
import numpy as np
import pytest
from skimage.measure import label
from skimage.segmentation import expand_labels

from unet.blocks import (CHUNK, SHIFT_MARGIN, Settings, chunk_shape, default_halo, fill_tile,
                         grid, label_tile, merge_tiles, predict_region, predict_section, read_input,
                         receptive_radius, tile_edges)
from unet.recipes import PRESETS, Recipe
from unet.tta import default_level, views_at

CROP = PRESETS["fullres"]    # input_mode "crop": the network sees native pixels
RESIZE = PRESETS["smoke"]    # input_mode "resize": the network sees the whole frame resized to 64
TOL = 1e-6


# ---- fake predictors ----------------------------------------------------------------------------

class LocalPredictor:
    """[N, C, H, W] -> [N, H, W]: the sigmoid of an asymmetric 5x5 filter of channel 0 (radius 2 px),
    a probability as the network gives. Asymmetric, so every TTA view gives a different result."""

    radius = 2

    def __init__(self, seed: int = 0) -> None:
        self.kernel = np.random.default_rng(seed).normal(size=(5, 5)).astype(np.float32)
        self.calls = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.float32 and batch.ndim == 4
        self.calls += 1
        out = [cv2.filter2D(x[0], -1, self.kernel, borderType=cv2.BORDER_REFLECT_101) for x in batch]
        return 1.0 / (1.0 + np.exp(-np.stack(out)))


class PointwisePredictor:
    """[N, C, H, W] -> [N, H, W]: a function of each pixel alone (radius 0)."""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.sqrt(batch[:, 0]) * 0.5 + batch[:, 0] ** 2


def _frames(z: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (z, h, w), dtype=np.uint8)


def _reader(volume: np.ndarray):
    return lambda z, y0, y1, x0, x1: volume[z, y0:y1, x0:x1]


def _section(predictor, volume: np.ndarray, z: int, **settings) -> np.ndarray:
    return predict_section(predictor, _reader(volume), volume.shape, z, Settings(**settings))


# ---- import weight --------------------------------------------------------------------------------

def test_importing_blocks_and_volume_io_does_not_load_mindspore():
    """A fresh interpreter: after importing the engine modules no mindspore module is loaded."""
    code = ("import sys, unet.blocks, unet.backends, unet.volume_io; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mindspore'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- receptive field and halo ------------------------------------------------------------------

def _unet_dependency_extent(depth: int = 4, convs: int = 2) -> int:
    """The farthest input pixel (one side, worst alignment on the 16-pixel grid) that the output of
    unet/model.py's UNet depends on, found by propagating a single input pixel's influence through
    its layer structure in 1-D: 3x3 'same' convs (reach 1), 2x2 max pools (stride 2), bilinear 2x
    upsampling with align_corners=False (fine pixel 2m reads coarse m-1 and m, 2m+1 reads m and
    m+1), skip concatenations (union). 1-D suffices: every layer is separable in its reach."""
    n = 2048

    def conv(a: np.ndarray) -> np.ndarray:
        return a | np.roll(a, 1) | np.roll(a, -1)

    def pool(a: np.ndarray) -> np.ndarray:
        return a[0::2] | a[1::2]

    def up(c: np.ndarray) -> np.ndarray:
        out = np.empty(2 * len(c), bool)
        out[0::2] = c | np.roll(c, 1)    # coarse m and m-1
        out[1::2] = c | np.roll(c, -1)   # coarse m and m+1
        return out

    def double(a):
        for _ in range(convs):
            a = conv(a)
        return a

    worst = 0
    for p in range(n // 2, n // 2 + 2**depth):  # every alignment on the pooling grid
        x = np.zeros(n, bool)
        x[p] = True
        skips = []
        y = x
        for _ in range(depth):
            y = double(y)
            skips.append(y)
            y = pool(y)
        y = double(y)
        for skip in reversed(skips):
            y = double(up(y) | skip)
        reach = np.flatnonzero(y)
        worst = max(worst, p - reach.min(), reach.max() - p)
    return worst


def test_unet_dependency_extent_of_the_layer_structure_is_122():
    """The 1-D propagation above gives 122 px. (Cross-checked once outside the tests: perturbing one
    pixel of a MindSpore UNet(1, 2) whose weights were made positive, so that no ReLU hides a
    dependency, changed outputs up to 121 px away; the farthest, tiniest term rounds away in float32.)"""
    assert _unet_dependency_extent() == 122


def test_receptive_radius_is_130_for_depth_4():
    # The bound unet/blocks.py documents ("130 px for 4 levels"), from unet/model.py's layers:
    #   encoder + bottom: 2 convs (3x3, reach 1) at strides 1, 2, 4, 8, 16: 2 * 31 = 62
    #   4 poolings 2x2, half a stride off centre each:   (1 + 2 + 4 + 8) / 2 =  7.5
    #   4 bilinear ups, one coarse pixel each:            2 + 4 + 8 + 16    = 30
    #   decoder: 2 convs at strides 8, 4, 2, 1:           2 * 15            = 30
    #   total 129.5 -> 130
    assert receptive_radius() == 130


def test_receptive_radius_covers_the_unet_dependency_extent():
    assert receptive_radius() >= _unet_dependency_extent()


def test_default_halo_of_a_crop_recipe_is_the_radius_at_the_smallest_scale_on_the_16_grid():
    assert default_halo(CROP) == 144                        # 130 rounded up to 16
    assert default_halo(CROP, (0.875, 1.0, 1.125)) == 160   # 130 / 0.875 = 148.6, rounded up to 16


@pytest.mark.parametrize("scale", [0.5, 0.875, 0.9, 1.0, 1.125, 2.0])
def test_default_halo_covers_the_dependency_extent_at_each_scale(scale):
    assert default_halo(CROP, (scale,)) >= math.ceil(_unet_dependency_extent() / scale)


def test_default_halo_of_a_resize_recipe_is_0_and_halos_are_on_the_16_grid():
    assert default_halo(RESIZE) == 0
    assert default_halo(RESIZE, (0.5, 1.0)) == 0
    for scales in [(1.0,), (0.875, 1.0, 1.125), (0.5,), (0.25,), (2.0,)]:
        halo = default_halo(CROP, scales)
        assert halo % 16 == 0 and halo >= receptive_radius() / min(scales)
    assert Settings(CROP).effective_halo == default_halo(CROP)
    assert Settings(CROP, halo=32).effective_halo == 32


@pytest.mark.parametrize("changes", [
    {"block": 100}, {"block": 48}, {"block": 0}, {"halo": 8}, {"halo": -16},
    {"scales": (0.2,)}, {"scales": (4.5,)}, {"scales": (1.0, 0.1)}, {"scales": ()}, {"tta": "x8"},
])
def test_settings_reject_invalid_values(changes):
    with pytest.raises(ValueError):
        Settings(CROP, **changes)


def test_settings_normalise_tta_and_scales():
    assert Settings(CROP, tta=True).tta == "d4" and Settings(CROP, tta=False).tta == "none"
    settings = Settings(CROP, scales=(1, 2), block=64, halo=0)
    assert settings.scales == (1.0, 2.0)
    assert settings.to_dict() == {"recipe": "fullres", "tta": "none", "scales": [1.0, 2.0],
                                  "shift": [0.0, 0.0], "block": 64, "halo": 0}


def test_d4_flips_takes_its_views_by_scale_and_is_the_default_of_d4_at_several_scales():
    assert [views_at("d4-flips", s) for s in (0.875, 1.0, 1.125)] == ["flips", "d4", "flips"]
    assert views_at(True, 0.5) == "d4" and views_at("none", 1.0) == "none"
    assert default_level(True, (0.875, 1.0, 1.125)) == "d4-flips" == default_level("d4", [1.0, 1.25])
    assert default_level(True, (1.0,)) == "d4" and default_level(False, (0.875, 1.0)) == "none"
    assert default_level("flips", (0.875, 1.0)) == "flips"
    assert Settings(CROP, tta="d4-flips").tta == "d4-flips"
    with pytest.raises(ValueError, match="unknown TTA level 'd8'"):
        Settings(CROP, tta="d8")


def test_d4_flips_is_d4_at_scale_1_and_flips_at_the_other_scales():
    volume = _frames(1, 200, 300, seed=3)
    scales = (0.875, 1.0, 1.125)
    mixed = _section(LocalPredictor(), volume, 0, recipe=CROP, scales=scales, tta="d4-flips", block=1024)
    parts = [_section(LocalPredictor(), volume, 0, recipe=CROP, scales=(s,), tta=t, block=1024)
             for s, t in ((0.875, "flips"), (1.0, "d4"), (1.125, "flips"))]
    assert np.abs(mixed - np.mean(parts, axis=0)).max() <= TOL
    d4 = _section(LocalPredictor(), volume, 0, recipe=CROP, scales=scales, tta="d4", block=1024)
    assert np.abs(mixed - d4).max() > 1e-3  # not d4 at every scale (the fake predictor is not symmetric)
    # at scale 1 alone it is d4; and block by block it equals the whole frame, as every level does
    native = _section(LocalPredictor(), volume, 0, recipe=CROP, tta="d4-flips", block=1024)
    assert np.abs(native - _section(LocalPredictor(), volume, 0, recipe=CROP, tta="d4", block=1024)).max() == 0
    blocks = _section(LocalPredictor(), volume, 0, recipe=CROP, scales=scales, tta="d4-flips", block=64)
    assert np.abs(blocks - mixed).max() <= TOL


# ---- grid and chunks ----------------------------------------------------------------------------

def test_grid_covers_every_voxel_once_in_section_major_raster_order():
    shape = (3, 300, 410)
    blocks = grid(shape, (128, 128))
    coverage = np.zeros(shape, np.int32)
    for b in blocks:
        assert b.y1 - b.y0 <= 128 and b.x1 - b.x0 <= 128 and b.y1 > b.y0 and b.x1 > b.x0
        coverage[b.z, b.y0:b.y1, b.x0:b.x1] += 1
    assert (coverage == 1).all()
    # ceil(300 / 128) = 3 rows, ceil(410 / 128) = 4 columns, 3 sections
    assert len(blocks) == 3 * 3 * 4
    assert [b.index for b in blocks] == list(range(len(blocks)))
    assert [(b.z, b.y0, b.x0) for b in blocks] == sorted((b.z, b.y0, b.x0) for b in blocks)
    assert len({b.name for b in blocks}) == len(blocks)


def test_chunk_shape_is_a_whole_number_of_chunks_per_block():
    assert CHUNK == 512
    assert chunk_shape(Settings(CROP, block=1024), (2000, 3000)) == (1, 512, 512)
    assert chunk_shape(Settings(CROP, block=800), (2000, 3000)) == (1, 800, 800)  # 512 does not divide 800
    assert chunk_shape(Settings(CROP, block=1024), (300, 300)) == (1, 300, 300)
    for h, w in [(300, 700), (2000, 3000), (64, 64)]:
        assert chunk_shape(Settings(RESIZE, block=800), (h, w)) == (1, min(512, h), min(512, w))


# ---- the engine with a fake predictor: block-wise equals whole-frame ------------------------

@pytest.mark.parametrize("tta", ["none", "flips", "d4"])
@pytest.mark.parametrize("shift", [(0.0, 0.0), (0.5, -0.25)])
def test_blocks_with_a_halo_equal_the_whole_frame(tta, shift):
    """200x300 (not a multiple of 16), blocks of 64 with a halo of 16 >= the predictor's radius 2."""
    volume = _frames(2, 200, 300)
    predictor = LocalPredictor()
    blocks = _section(predictor, volume, 1, recipe=CROP, tta=tta, shift=shift, halo=16, block=64)
    calls = predictor.calls
    whole = _section(predictor, volume, 1, recipe=CROP, tta=tta, shift=shift, halo=16, block=1024)
    assert predictor.calls - calls < calls  # one region against 4 x 5 blocks
    assert blocks.shape == (200, 300) and blocks.dtype == np.float32
    assert np.abs(blocks - whole).max() <= TOL


def test_the_fake_predictor_is_not_symmetric_so_tta_and_sections_matter():
    volume = _frames(2, 200, 300)
    predictor = LocalPredictor()
    none = _section(predictor, volume, 1, recipe=CROP, halo=16, block=1024)
    assert np.abs(none - _section(predictor, volume, 1, recipe=CROP, tta="d4", halo=16, block=1024)).max() > 1e-2
    assert np.abs(none - _section(predictor, volume, 1, recipe=CROP, tta="flips", halo=16, block=1024)).max() > 1e-2
    assert np.abs(none - _section(predictor, volume, 0, recipe=CROP, halo=16, block=1024)).max() > 1e-2


def test_blocks_without_a_halo_differ_from_the_whole_frame():
    volume = _frames(1, 200, 300)
    blocks = _section(LocalPredictor(), volume, 0, recipe=CROP, halo=0, block=64)
    whole = _section(LocalPredictor(), volume, 0, recipe=CROP, halo=0, block=1024)
    assert np.abs(blocks - whole).max() > 1e-2


def test_the_shift_margin_alone_makes_a_pointwise_prediction_blockwise_exact():
    """halo 0 and a radius-0 predictor: only SHIFT_MARGIN pixels around each core feed the shift."""
    assert SHIFT_MARGIN >= 2  # bilinear shifts by up to 1.5 px read 2 px
    volume = _frames(1, 200, 300, seed=1)
    for shift in [(0.5, -0.25), (-1.5, 1.5)]:
        blocks = _section(PointwisePredictor(), volume, 0, recipe=CROP, shift=shift, halo=0, block=64)
        whole = _section(PointwisePredictor(), volume, 0, recipe=CROP, shift=shift, halo=0, block=1024)
        assert np.abs(blocks - whole).max() <= TOL


def test_blocks_equal_the_whole_frame_with_test_time_scales_and_the_default_halo():
    volume = _frames(1, 200, 300, seed=2)
    scales = (0.875, 1.0, 1.125)
    blocks = _section(LocalPredictor(), volume, 0, recipe=CROP, scales=scales, tta="flips", block=64)
    whole = _section(LocalPredictor(), volume, 0, recipe=CROP, scales=scales, tta="flips", block=1024)
    assert np.abs(blocks - whole).max() <= TOL


def test_blocks_equal_the_whole_frame_on_a_real_isbi_crop(isbi_dir):
    import tifffile

    frame = tifffile.imread(isbi_dir / "test-volume.tif", key=3)[100:300, 150:450]  # 200 x 300
    volume = np.ascontiguousarray(frame[None])
    blocks = _section(LocalPredictor(), volume, 0, recipe=CROP, tta="d4", halo=16, block=64)
    whole = _section(LocalPredictor(), volume, 0, recipe=CROP, tta="d4", halo=16, block=1024)
    assert np.abs(blocks - whole).max() <= TOL


def test_read_input_stacks_neighbouring_sections_clamped_at_the_ends():
    volume = _frames(3, 64, 80)
    read = _reader(volume)
    np.testing.assert_array_equal(read_input(read, 1, 3, 1, 0, 10, 5, 20), volume[1, :10, 5:20])
    first = read_input(read, 0, 3, 3, 0, 10, 5, 20)
    np.testing.assert_array_equal(first.transpose(2, 0, 1), volume[[0, 0, 1], :10, 5:20])
    last = read_input(read, 2, 3, 3, 0, 10, 5, 20)
    np.testing.assert_array_equal(last.transpose(2, 0, 1), volume[[1, 2, 2], :10, 5:20])


def test_blocks_of_a_three_section_recipe_equal_the_whole_frame():
    recipe = Recipe(name="sections3", in_channels=3, sections=3, input_mode="crop", image_size=64)
    volume = _frames(3, 130, 150, seed=3)

    def predictor(batch):  # a mix of the three sections' pixels, filtered: radius 2
        mixed = batch[:, 0] - 2 * batch[:, 1] + 0.5 * batch[:, 2]
        return LocalPredictor()(mixed[:, None])

    for z in range(3):
        blocks = _section(predictor, volume, z, recipe=recipe, halo=16, block=64)
        whole = _section(predictor, volume, z, recipe=recipe, halo=16, block=1024)
        assert np.abs(blocks - whole).max() <= TOL


# ---- resize recipes -------------------------------------------------------------------------------

def test_resize_recipes_predict_whole_sections_whatever_the_block():
    volume = _frames(1, 200, 300, seed=4)
    assert Settings(RESIZE, block=64).tile((200, 300)) == (200, 300)
    assert Settings(CROP, block=64).tile((200, 300)) == (64, 64)
    seen = []

    def predictor(batch):
        seen.append(batch.shape)
        return LocalPredictor()(batch)

    whole = predict_region(predictor, volume[0], Settings(RESIZE, tta="d4"))
    assert whole.shape == (200, 300) and {s[1:] for s in seen} == {(1, 64, 64)}  # the recipe's size
    for block in (64, 128, 1024):
        got = _section(predictor, volume, 0, recipe=RESIZE, tta="d4", block=block)
        np.testing.assert_array_equal(got, whole)


# ---- cell instances tile by tile ----------------------------------------------------------------

def _blobby_mask(shape: tuple[int, int], density: float, seed: int) -> np.ndarray:
    """Blobs covering about ``density`` of the frame: smoothed noise above its quantile."""
    noise = np.random.default_rng(seed).random(shape).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 3.0)
    return smooth > np.quantile(smooth, 1.0 - density)


def _label_by_tiles(mask: np.ndarray, tile: tuple[int, int] = (64, 64)):
    """As tasks/segment.py labels a section: local labels per tile, stitched into one image, merged
    along the tile edges read from it; returns the tiles, the stitched local labels and the LUTs."""
    h, w = mask.shape
    tiles = grid((1, h, w), tile)
    local = np.zeros((h, w), np.uint32)
    firsts = []
    for t in tiles:
        labelled = label_tile(mask[t.y0:t.y1, t.x0:t.x1], t.y0, t.x0, w)
        local[t.y0:t.y1, t.x0:t.x1] = labelled.labels
        firsts.append(labelled.first)

    def edges():
        for a, b, side in tile_edges(tiles):
            ta, tb = tiles[a], tiles[b]
            if side == "below":
                yield a, b, local[ta.y1 - 1, ta.x0:ta.x1], local[tb.y0, tb.x0:tb.x1]
            else:
                yield a, b, local[ta.y0:ta.y1, ta.x1 - 1], local[tb.y0:tb.y1, tb.x0]

    return tiles, local, merge_tiles(tiles, firsts, edges())


def _merged(mask: np.ndarray) -> np.ndarray:
    tiles, local, luts = _label_by_tiles(mask)
    out = np.zeros(mask.shape, np.uint32)
    for t, lut in zip(tiles, luts):
        out[t.y0:t.y1, t.x0:t.x1] = lut[local[t.y0:t.y1, t.x0:t.x1]]
    return out


MASKS = {f"density {d}": (lambda d=d, s=s: _blobby_mask((300, 410), d, seed=s))
         for s, d in enumerate((0.1, 0.3, 0.5, 0.7, 0.9))}
MASKS["empty"] = lambda: np.zeros((300, 410), bool)
MASKS["full"] = lambda: np.ones((300, 410), bool)
MASKS["noise"] = lambda: np.random.default_rng(9).random((300, 410)) < 0.5  # many 1-pixel components


@pytest.mark.parametrize("name", list(MASKS))
def test_tile_labels_merged_equal_skimage_label_of_the_whole_section(name):
    mask = MASKS[name]()
    expected = label(mask, connectivity=1)
    np.testing.assert_array_equal(_merged(mask), expected)


def test_tile_edges_are_the_shared_edges_of_a_grid():
    tiles = grid((1, 300, 410), (64, 64))  # 5 rows x 7 columns
    edges = list(tile_edges(tiles))
    assert sum(side == "below" for *_, side in edges) == 4 * 7
    assert sum(side == "right" for *_, side in edges) == 5 * 6
    for a, b, side in edges:
        ta, tb = tiles[a], tiles[b]
        assert (tb.y0, tb.x0) == ((ta.y1, ta.x0) if side == "below" else (ta.y0, ta.x1))


def test_label_tile_first_pixels_are_section_raster_indices():
    mask = np.zeros((20, 30), bool)
    mask[5, 12:15] = mask[8:10, 20] = True
    tile = label_tile(mask[4:12, 10:25], 4, 10, 30)
    assert tile.count == 2
    np.testing.assert_array_equal(tile.first, [5 * 30 + 12, 8 * 30 + 20])


@pytest.mark.parametrize("name", ["density 0.3", "density 0.5", "density 0.7", "noise", "empty", "full"])
def test_fill_tile_equals_expand_labels_of_the_whole_section(name):
    mask, distance = MASKS[name](), 8
    labels = label(mask, connectivity=1).astype(np.uint32)
    expected = expand_labels(labels, distance)
    h, w = mask.shape
    for t in grid((1, h, w), (64, 64)):
        ry0, ry1 = max(t.y0 - distance, 0), min(t.y1 + distance, h)
        rx0, rx1 = max(t.x0 - distance, 0), min(t.x1 + distance, w)
        core = (t.y0 - ry0, t.y1 - ry0, t.x0 - rx0, t.x1 - rx0)
        got = fill_tile(labels[ry0:ry1, rx0:rx1], core, distance)
        assert got.dtype == np.uint32
        np.testing.assert_array_equal(got, expected[t.y0:t.y1, t.x0:t.x1], err_msg=str(t))
