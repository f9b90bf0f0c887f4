"""Block-wise inference: a volume [Z, H, W] cut into blocks (one section x one tile), each
predicted from its region grown by a halo and cropped back to its core, so that the stitched
probabilities equal whole-frame inference; then cell instances labelled tile by tile and merged
across tile edges.

Why the result does not depend on the blocks (for crop recipes, the network seeing native pixels):
the UNet's output at a pixel depends only on the input within its receptive field
(:func:`receptive_radius`, 130 px for 4 levels), so a core whose halo is at least that wide sees
everything whole-frame inference would. Blocks start at multiples of 16 (the network's pooling
grid); the frame is mirrored out to a multiple of 16 at its bottom and right (as the network pads
it), so that every TTA view of a region sits on the same grid as the same view of the whole frame;
at the frame's edges the region stops at the edge, as the whole frame does. Measured on real ISBI
frames: at most 2e-7 from whole-frame inference, with or without TTA, at any frame size. Test-time
scales below 1 widen the field in frame pixels; :func:`default_halo` accounts for them. Resize
recipes (the network sees the whole frame resized) predict one block per section.

Cell instances (:func:`label_tile`, :func:`merge_tiles`, :func:`fill_tile`) are the 4-connected
components of ``prob >= threshold`` with the same ids, in the same order, as
:func:`skimage.measure.label` on the whole section, grown over the membrane by at most
``fill_distance`` pixels (:func:`unet.segment.segment_cells`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
from skimage.measure import label
from skimage.segmentation import expand_labels

from unet.align import shift
from unet.tta import Predictor, predict_views, tta_level, views_at
from unet.data import to_network_input
from unet.recipes import Recipe

MULTIPLE = 16          # the network's pooling grid (unet.model.MULTIPLE), kept free of MindSpore here
DEPTH = 4              # pooling levels of unet.model.UNet
DEFAULT_BLOCK = 1024   # core side of a block for crop recipes: one 1024 tile + halo per forward pass
CHUNK = 512            # storage chunk side; blocks are whole numbers of chunks
SHIFT_MARGIN = 2       # pixels beyond the core an alignment shift (|d| <= 1.5 px, bilinear) reads

# read(z, y0, y1, x0, x1) -> uint8 [y1 - y0, x1 - x0] of section z
RegionReader = Callable[[int, int, int, int, int], np.ndarray]


def receptive_radius(depth: int = DEPTH, convs: int = 2) -> int:
    """How far (in input pixels) the UNet's output at a pixel sees: its 3x3 convolutions at each
    level's stride, the 2x2 poolings and the bilinear upsamplings (130 for depth 4)."""
    down = sum(convs * 2**level for level in range(depth + 1))      # encoder and bottom convs
    pools = sum(2**level / 2 for level in range(depth))
    # a 2x bilinear upsampling reads the neighbouring coarse pixel, 2**(level + 1) fine pixels away
    up = sum(2 ** (level + 1) + convs * 2**level for level in range(depth))  # + the decoder convs
    return math.ceil(down + pools + up)


def default_halo(recipe: Recipe, scales: Sequence[float] = (1.0,)) -> int:
    """The halo that makes block-wise inference equal whole-frame inference: the receptive radius
    at the smallest scale, rounded up to the pooling grid (0 for resize recipes, which predict
    whole sections)."""
    if recipe.input_mode == "resize":
        return 0
    return _round_up(receptive_radius() / min(scales), MULTIPLE)


def _round_up(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple)) * multiple


@dataclass(frozen=True)
class Block:
    """One section's tile: the core [y0:y1, x0:x1] of section ``z`` that the block writes."""

    index: int
    z: int
    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def name(self) -> str:
        return f"z{self.z:05d}-y{self.y0:06d}-x{self.x0:06d}"


@dataclass(frozen=True)
class Settings:
    """What decides a block's probabilities besides the model's weights."""

    recipe: Recipe
    tta: str = "none"
    scales: tuple[float, ...] = (1.0,)
    shift: tuple[float, float] = (0.0, 0.0)  # the model's alignment (dy, dx), applied to the probabilities
    block: int = DEFAULT_BLOCK
    halo: int | None = None                   # None: default_halo(recipe, scales)
    _halo: int = field(init=False, repr=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tta", tta_level(self.tta))
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        if not self.scales or any(not 0.25 <= s <= 4.0 for s in self.scales):
            raise ValueError(f"test-time scales must be between 0.25 and 4, got {list(self.scales)}")
        if self.block < 64 or self.block % MULTIPLE:
            raise ValueError(f"block must be a multiple of {MULTIPLE} and >= 64, got {self.block}")
        halo = default_halo(self.recipe, self.scales) if self.halo is None else self.halo
        if halo < 0 or halo % MULTIPLE:
            raise ValueError(f"halo must be a multiple of {MULTIPLE} and >= 0, got {halo}")
        object.__setattr__(self, "_halo", halo)

    @property
    def effective_halo(self) -> int:
        return self._halo

    def tile(self, frame_shape: tuple[int, int]) -> tuple[int, int]:
        """The core size of blocks on frames of ``frame_shape``: whole frames for resize recipes."""
        if self.recipe.input_mode == "resize":
            return frame_shape
        return self.block, self.block

    def to_dict(self) -> dict:
        return {"recipe": self.recipe.name, "tta": self.tta, "scales": list(self.scales),
                "shift": list(self.shift), "block": self.block, "halo": self.effective_halo}


def chunk_shape(settings: Settings, frame_shape: tuple[int, int]) -> tuple[int, int, int]:
    """Storage chunks (1, cy, cx): CHUNK, or the block when CHUNK does not divide it, so that each
    chunk is written by one block only (resize recipes write whole sections)."""
    h, w = frame_shape
    crop = settings.recipe.input_mode == "crop"
    side = settings.block if crop and settings.block % CHUNK else CHUNK
    return 1, min(side, h), min(side, w)


def grid(shape: tuple[int, int, int], tile: tuple[int, int]) -> list[Block]:
    """Blocks covering ``shape`` (Z, H, W) with cores of ``tile`` (the last row and column
    smaller), in section-major, raster order."""
    z_count, h, w = shape
    ty, tx = tile
    blocks = []
    for z in range(z_count):
        for y0 in range(0, h, ty):
            for x0 in range(0, w, tx):
                blocks.append(Block(len(blocks), z, y0, min(y0 + ty, h), x0, min(x0 + tx, w)))
    return blocks


def read_input(read: RegionReader, z: int, z_count: int, sections: int,
               y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """The network's view of a region: uint8 [h, w] for one section, else [h, w, sections] with
    the neighbouring sections (clamped at the stack's ends, as :func:`unet.data.section_paths`)."""
    if sections == 1:
        return read(z, y0, y1, x0, x1)
    radius = sections // 2
    return np.stack([read(min(max(z + d, 0), z_count - 1), y0, y1, x0, x1)
                     for d in range(-radius, radius + 1)], axis=-1)


def _predict_resized(predictor: Predictor, image: np.ndarray, recipe: Recipe, scale: float, tta: str) -> np.ndarray:
    """Resize recipes: the frame at the network's training size (times ``scale``), resized back."""
    h, w = image.shape[:2]
    side = recipe.image_size if scale == 1.0 else max(16, int(round(recipe.image_size * scale / 16)) * 16)
    small = cv2.resize(image, (side, side), interpolation=cv2.INTER_LINEAR)
    prob = predict_views(predictor, to_network_input(small, recipe.in_channels), tta)
    return cv2.resize(prob.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)


def _predict_native(predictor: Predictor, image: np.ndarray, recipe: Recipe, scale: float, tta: str) -> np.ndarray:
    """Crop recipes: the region as it is (``scale`` 1), or resized by ``scale`` and back."""
    h, w = image.shape[:2]
    if scale != 1.0:
        image = cv2.resize(image, (max(16, round(w * scale)), max(16, round(h * scale))),
                           interpolation=cv2.INTER_LINEAR)
    prob = predict_views(predictor, to_network_input(image, recipe.in_channels), tta).astype(np.float32)
    return prob if scale == 1.0 else cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)


def predict_region(predictor: Predictor, image: np.ndarray, settings: Settings) -> np.ndarray:
    """Probabilities float32 [h, w] of one region (uint8 [h, w] or [h, w, sections]), averaged
    over the test-time scales and TTA views; no alignment shift."""
    predict = _predict_resized if settings.recipe.input_mode == "resize" else _predict_native
    probs = [predict(predictor, image, settings.recipe, s, views_at(settings.tta, s)) for s in settings.scales]
    return probs[0] if len(probs) == 1 else np.mean(probs, axis=0).astype(np.float32)


def predict_block(predictor: Predictor, read: RegionReader, shape: tuple[int, int, int], block: Block,
                  settings: Settings) -> np.ndarray:
    """The block's core of cell probabilities, float32 [y1 - y0, x1 - x0]: its region (core +
    halo, clipped to the frame) predicted, shifted by the alignment, cropped to the core."""
    z_count, h, w = shape
    shifted = settings.shift != (0.0, 0.0)
    pad = max(settings.effective_halo, SHIFT_MARGIN if shifted else 0)
    # crop recipes see the frame mirrored out to a multiple of 16 (as the network itself pads it), so
    # that every region, turned by the TTA views or not, sits on the same pooling grid as the frame
    vh, vw = (h, w) if settings.recipe.input_mode == "resize" else (_round_up(h, MULTIPLE), _round_up(w, MULTIPLE))
    ry0, ry1 = max(block.y0 - pad, 0), min(block.y1 + pad, vh)
    rx0, rx1 = max(block.x0 - pad, 0), min(block.x1 + pad, vw)
    image = read_input(read, block.z, z_count, settings.recipe.sections, ry0, min(ry1, h), rx0, min(rx1, w))
    if (ry1, rx1) != (min(ry1, h), min(rx1, w)):
        mirror = ((0, ry1 - min(ry1, h)), (0, rx1 - min(rx1, w))) + ((0, 0),) * (image.ndim - 2)
        image = np.pad(image, mirror, mode="reflect")
    prob = predict_region(predictor, image, settings)
    if shifted:
        # the shift reads SHIFT_MARGIN pixels around the core: shift that window (clipped to the
        # frame, so that frame edges mirror exactly as whole-frame shifting does), then crop
        wy0, wy1 = max(block.y0 - SHIFT_MARGIN, 0), min(block.y1 + SHIFT_MARGIN, h)
        wx0, wx1 = max(block.x0 - SHIFT_MARGIN, 0), min(block.x1 + SHIFT_MARGIN, w)
        window = shift(prob[wy0 - ry0:wy1 - ry0, wx0 - rx0:wx1 - rx0], *settings.shift)
        return window[block.y0 - wy0:block.y1 - wy0, block.x0 - wx0:block.x1 - wx0]
    return prob[block.y0 - ry0:block.y1 - ry0, block.x0 - rx0:block.x1 - rx0]


def predict_section(predictor: Predictor, read: RegionReader, shape: tuple[int, int, int], z: int,
                    settings: Settings) -> np.ndarray:
    """All blocks of section ``z`` stitched: float32 [H, W]."""
    _, h, w = shape
    out = np.empty((h, w), np.float32)
    for block in grid((1, h, w), settings.tile((h, w))):
        block = Block(block.index, z, block.y0, block.y1, block.x0, block.x1)
        out[block.y0:block.y1, block.x0:block.x1] = predict_block(predictor, read, shape, block, settings)
    return out


def predict_array(predictor: Predictor, frame: np.ndarray, settings: Settings) -> np.ndarray:
    """Cell probabilities float32 [H, W] of one frame held in memory (uint8 [H, W], or [H, W,
    sections] with its neighbours as :func:`unet.data.read_sections` gives them): what the
    segmentation flow computes for that section of a volume."""
    h, w = frame.shape[:2]
    if frame.ndim == 2:
        return predict_section(predictor, lambda z, y0, y1, x0, x1: frame[y0:y1, x0:x1], (1, h, w), 0, settings)
    sections = frame.shape[-1]
    return predict_section(predictor, lambda z, y0, y1, x0, x1: frame[y0:y1, x0:x1, z], (sections, h, w),
                           sections // 2, settings)


# ---- cell instances, tile by tile ---------------------------------------------------------------

@dataclass(frozen=True)
class TileLabels:
    """The 4-connected components of one tile's mask: ``labels`` numbered 1..count in the tile's
    raster order, and ``first`` the section-wide raster index (y * W + x) of each one's first pixel."""

    labels: np.ndarray
    first: np.ndarray

    @property
    def count(self) -> int:
        return len(self.first)


def label_tile(mask: np.ndarray, y0: int, x0: int, width: int) -> TileLabels:
    """:class:`TileLabels` of the tile ``mask`` (bool [h, w]) whose top-left pixel is (y0, x0) of a
    section ``width`` pixels wide."""
    labels = label(mask, connectivity=1).astype(np.uint32)
    ids, first = np.unique(labels.ravel(), return_index=True)
    first = first[ids > 0]
    fy, fx = np.divmod(first, mask.shape[1])
    return TileLabels(labels, ((fy + y0) * width + fx + x0).astype(np.int64))


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def merge_tiles(tiles: Sequence[Block], first: Sequence[np.ndarray],
                edges: Iterator[tuple[int, int, np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """Section-wide ids for the tiles' local labels: one lookup table per tile (local id -> id,
    index 0 -> 0). Components that touch across a tile edge get one id; ids are numbered in
    section raster order of each component's first pixel (as :func:`skimage.measure.label` numbers
    the whole section). ``edges`` yields (tile a, tile b, a's labels along the shared edge, b's
    labels along it), pixel for pixel."""
    offsets = np.cumsum([0] + [len(f) for f in first])
    forest = _UnionFind(int(offsets[-1]) + 1)
    for a, b, la, lb in edges:
        touching = (la > 0) & (lb > 0)
        for u, v in set(zip(la[touching].tolist(), lb[touching].tolist())):
            forest.union(int(offsets[a]) + u, int(offsets[b]) + v)
    n = int(offsets[-1])
    if n == 0:
        return [np.zeros(1, np.uint32) for _ in tiles]
    roots = np.array([forest.find(i) for i in range(1, n + 1)])
    starts = np.concatenate(first)
    # each component starts where its earliest member starts; number components by that
    component_start = np.full(n + 1, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(component_start, roots, starts)
    order = np.argsort(component_start[np.unique(roots)], kind="stable")
    ids = np.zeros(n + 1, np.uint32)
    ids[np.unique(roots)[order]] = np.arange(1, len(order) + 1, dtype=np.uint32)
    return [np.concatenate([[0], ids[roots[offsets[t]:offsets[t + 1]]]]).astype(np.uint32)
            for t in range(len(tiles))]


def tile_edges(tiles: Sequence[Block]) -> Iterator[tuple[int, int, str]]:
    """(a, b, "below" | "right") for tiles b directly below or right of a, sharing an edge."""
    where = {(t.y0, t.x0): i for i, t in enumerate(tiles)}
    for i, t in enumerate(tiles):
        if (t.y1, t.x0) in where:
            yield i, where[(t.y1, t.x0)], "below"
        if (t.y0, t.x1) in where:
            yield i, where[(t.y0, t.x1)], "right"


def fill_tile(labels: np.ndarray, core: tuple[int, int, int, int], distance: int) -> np.ndarray:
    """The core (y0, y1, x0, x1 within ``labels``) of ``labels`` grown over the membrane (0) by at
    most ``distance`` pixels; ``labels`` must reach ``distance`` beyond the core where the section does."""
    y0, y1, x0, x1 = core
    grown = expand_labels(labels, distance=distance) if distance > 0 and labels.any() else labels
    return grown[y0:y1, x0:x1].astype(np.uint32)
