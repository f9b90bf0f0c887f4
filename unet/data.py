"""Datasets: albumentations pipelines per recipe and MindSpore ``GeneratorDataset`` sources.

Samples are float32 image [C, H, W] in [0, 1] and float32 mask [1, H, W] in {0, 1} (1 = cell);
with boundary weights (``SegmentationSource(..., boundary=(w0, sigma))``) the mask is [2, H, W]:
the cell mask and its U-Net weight map, augmented together. Masks and weight maps always go
through nearest-neighbour interpolation, so masks stay binary — unless the labels are registered
to their images (``register_labels=True``): a sub-pixel shift makes them soft, in [0, 1].

albumentations is imported by the functions that build the transforms: inference (:mod:`unet.blocks`
uses :func:`to_network_input`) runs without it (the ``infer`` install, pyproject.toml).
"""
from __future__ import annotations

import copy
import threading
import warnings
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from unet.align import Alignment, estimate_shift, image_as_probability, shift
from unet.recipes import Recipe

NEAREST = cv2.INTER_NEAREST
# Resizing masks: OpenCV's INTER_NEAREST picks source pixel floor(x * scale), which moves a mask
# resized 512 -> 224 by about half a pixel down and right of its image (resized with half-pixel
# centres); INTER_NEAREST_EXACT picks the pixel under each centre and keeps them together.
# (Affine and elastic warps round to the nearest pixel and are not affected.)
RESIZE_NEAREST = cv2.INTER_NEAREST_EXACT
# The case ran albumentations 1.x, whose geometric transforms filled borders by reflection.
REFLECT = cv2.BORDER_REFLECT_101


def case_train_transforms(size: int) -> A.Compose:
    """The case's training augmentation: resize, then flips, shift-scale-rotate, 90-degree turns."""
    with warnings.catch_warnings():
        # albumentations 2 suggests Affine instead; ShiftScaleRotate is what the case used
        warnings.filterwarnings("ignore", message="ShiftScaleRotate is a special case")
        return _case_train_transforms(size)


def _case_train_transforms(size: int) -> A.Compose:
    import albumentations as A

    return A.Compose([
        A.Resize(size, size, mask_interpolation=RESIZE_NEAREST),
        A.Transpose(p=0.5),
        A.HorizontalFlip(p=0.25),
        A.VerticalFlip(p=0.25),
        A.ShiftScaleRotate(p=0.25, border_mode=REFLECT, mask_interpolation=NEAREST),
        A.RandomRotate90(p=0.25),
    ])


def resize_transforms(size: int) -> A.Compose:
    """The case's validation transform: resize only."""
    import albumentations as A

    return A.Compose([A.Resize(size, size, mask_interpolation=RESIZE_NEAREST)])


def eval_transforms(recipe: Recipe) -> A.Compose:
    """What the per-epoch validation (and "metrics at the training size") see: the resized frame
    (resize recipes, the case) or the whole native frame, without test-time augmentation (crop
    recipes: a central crop was a quarter of the pixels and too noisy to pick the checkpoint)."""
    import albumentations as A

    if recipe.input_mode == "crop":
        return A.Compose([])
    return resize_transforms(recipe.image_size)


def fullres_train_transforms(size: int) -> A.Compose:
    """Native-resolution training: random crops, the 8 flips/rotations, mild affine and elastic
    deformation, brightness/contrast jitter (EM sections vary in staining)."""
    import albumentations as A

    return A.Compose([
        A.RandomCrop(size, size),
        A.D4(p=1.0),
        A.Affine(scale=(0.9, 1.1), rotate=(-20, 20), translate_percent=(-0.05, 0.05),
                 border_mode=REFLECT, mask_interpolation=NEAREST, p=0.5),
        A.ElasticTransform(alpha=30, sigma=6, border_mode=REFLECT, mask_interpolation=NEAREST, p=0.3),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
    ])


def train_transforms(recipe: Recipe) -> A.Compose:
    """The training augmentation the recipe names, seeded with ``recipe.seed``."""
    import albumentations as A

    if recipe.augmentation == "case":
        transform = case_train_transforms(recipe.image_size)
    elif recipe.augmentation == "fullres":
        transform = fullres_train_transforms(recipe.image_size)
    elif recipe.input_mode == "crop":
        transform = A.Compose([A.RandomCrop(recipe.image_size, recipe.image_size)])
    else:
        transform = resize_transforms(recipe.image_size)
    transform.set_random_seed(recipe.seed)
    transform.seed = recipe.seed
    return transform


def boundary_weight_map(mask: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    """The U-Net weight map of a binary cell mask [H, W]: float32
    ``1 + w0 * exp(-(d1 + d2)^2 / (2 sigma^2))``, d1 and d2 the Euclidean distances to the nearest
    and the second-nearest cell (4-connected components of ``mask``; 0 inside a cell for its own).
    Pixels on a thin membrane between two cells get about ``1 + w0``; with fewer than two cells
    the map is all 1."""
    from skimage.measure import label

    cells = label(np.asarray(mask) > 0, connectivity=1)
    d1 = np.full(cells.shape, np.inf, np.float32)
    d2 = np.full(cells.shape, np.inf, np.float32)
    for i in range(1, int(cells.max()) + 1):
        # distance of every pixel to cell i: distanceTransform measures to the nearest zero pixel
        d = cv2.distanceTransform((cells != i).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        d2 = np.minimum(d2, np.maximum(d1, d))
        d1 = np.minimum(d1, d)
    return (1.0 + w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma**2))).astype(np.float32)


def central_crops(frames: Sequence[np.ndarray]) -> np.ndarray:
    """Frames [H_i, W_i] as one stack [N, H, W]: frames of one size as they are, frames of
    different sizes (several volumes) cut to their common central region (min H_i x min W_i)."""
    h, w = min(f.shape[0] for f in frames), min(f.shape[1] for f in frames)
    crops = [f[(f.shape[0] - h) // 2:(f.shape[0] - h) // 2 + h, (f.shape[1] - w) // 2:(f.shape[1] - w) // 2 + w]
             for f in frames]
    return np.stack(crops)


def label_offset(images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> Alignment:
    """How far the labels sit from their images' membranes: the shift (0.25 px steps, up to 1.5 px)
    that best maps the images, read as a crude cell probability (:func:`unet.align.image_as_probability`),
    onto the binary masks. ISBI 2012's training frames give (-0.5, -0.25): the labels are drawn
    half a pixel above the dark membrane pixels. Frames of different sizes are compared on their
    common central region (:func:`central_crops`)."""
    return estimate_shift(image_as_probability(central_crops(images)), central_crops(masks))


def read_grey(path: Path | str) -> np.ndarray:
    """A PNG frame as uint8 [H, W]; a clear error if it cannot be read."""
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ValueError(f"{path}: cannot be read as an image")
    return img


def stack_folders(image: Path) -> list[Path]:
    """The folders holding ``image``'s stack: in a split laid out by :mod:`unet.split`, the train
    and val frames are one stack (``train/image`` and ``val/image``), the test frames another
    (``test_imgs``); anywhere else, the image's own folder."""
    folder = image.parent
    if folder.name == "image" and folder.parent.name in ("train", "val"):
        root = folder.parent.parent
        return [root / "train" / "image", root / "val" / "image"]
    return [folder]


def volume_of(name: str) -> str:
    """The volume prefix of a frame name: ``v1`` for ``v1-00003.png`` (several labelled volumes,
    :func:`unet.frames.volume_prefix`), ``""`` for ``00003.png``."""
    return name.rsplit("-", 1)[0] if "-" in name else ""


def section_paths(image: Path | str, sections: int) -> list[Path]:
    """``image`` between its neighbours: the ``sections // 2`` frames before and after it in its
    stack (:func:`stack_folders`, the frames of its own volume, :func:`volume_of`, ordered by file
    name, e.g. 00003.png); at a stack's ends the nearest frame repeats."""
    image = Path(image)
    stack = sorted((p for folder in stack_folders(image) for p in folder.glob("*.png")
                    if volume_of(p.name) == volume_of(image.name)), key=lambda p: p.name)
    try:
        z = [p.name for p in stack].index(image.name)
    except ValueError:
        folders = ", ".join(map(str, stack_folders(image)))
        raise ValueError(f"{image}: not found among the frames of its stack ({folders})") from None
    radius = sections // 2
    return [stack[min(max(z + d, 0), len(stack) - 1)] for d in range(-radius, radius + 1)]


def read_sections(path: Path | str, sections: int = 1) -> np.ndarray:
    """The network's view of a frame, uint8: [H, W] for ``sections`` 1 (:func:`read_grey`), else
    [H, W, sections], the frame and its neighbouring sections (:func:`section_paths`) as channels,
    the frame itself in the middle one. A clear error when a neighbour differs in size."""
    if sections == 1:
        return read_grey(path)
    frames = [read_grey(p) for p in section_paths(path, sections)]
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise ValueError(f"{path}: its neighbouring sections differ in size: {sorted(shapes)}")
    return np.stack(frames, axis=-1)


def middle_section(image: np.ndarray) -> np.ndarray:
    """The frame itself from :func:`read_sections`' output (grey [H, W] as it is)."""
    return image if image.ndim == 2 else image[..., image.shape[-1] // 2]


def to_network_input(image: np.ndarray, in_channels: int) -> np.ndarray:
    """uint8 [H, W] -> float32 [C, H, W] in [0, 1], the grey frame repeated ``in_channels`` times;
    uint8 [H, W, C] (neighbouring sections, :func:`read_sections`) -> float32 [C, H, W]."""
    x = image.astype(np.float32) / 255.0
    if x.ndim == 3:
        if x.shape[-1] != in_channels:
            raise ValueError(f"expected {in_channels} input channels, got an image of shape {image.shape}")
        return np.ascontiguousarray(x.transpose(2, 0, 1))
    return np.repeat(x[None], in_channels, axis=0)


class SegmentationSource:
    """Random-access source for ``GeneratorDataset``: (image [C,H,W], mask [1,H,W]) float32.

    Frames are read once into memory (ISBI is 30 frames of 512x512). ``length`` lets a crop
    recipe draw more samples per epoch than there are frames; sample ``i`` uses frame
    ``i % len(pairs)``. With ``boundary=(w0, sigma)`` each mask gets its
    :func:`boundary_weight_map` as a second channel. With ``register_labels``, the masks (and weight
    maps) are shifted onto their images by the opposite of :func:`label_offset` of these frames
    (``label_shift``), bilinearly: the mask becomes soft at the edges. ``sections`` 3: each image is
    the frame between its neighbouring sections (:func:`read_sections`). With a ``seed``,
    ``set_epoch(e)`` fixes epoch ``e``: its sample order is a permutation seeded by (seed, e), and each sample is augmented with random numbers seeded by
    (seed, e, i), whatever thread draws it. Training is then reproducible with parallel workers
    and after a resume (iterate the dataset unshuffled: the source does the shuffling).
    """

    def __init__(self, pairs: Sequence[tuple[Path, Path]], transform: A.Compose, in_channels: int,
                 length: int | None = None, seed: int | None = None,
                 boundary: tuple[float, float] | None = None, register_labels: bool = False,
                 sections: int = 1) -> None:
        if not pairs:
            raise ValueError("no (image, mask) pairs given")
        self.images = [read_sections(img, sections) for img, _ in pairs]
        self.masks = [(read_grey(msk) > 127).astype(np.uint8) for _, msk in pairs]
        self.weights = None if boundary is None else [boundary_weight_map(m, *boundary) for m in self.masks]
        self.label_shift = (0.0, 0.0)
        if register_labels:
            offset = label_offset([middle_section(img) for img in self.images], self.masks)
            self.label_shift = (-offset.dy or 0.0, -offset.dx or 0.0)  # no -0.0
            if not offset.is_zero:
                self.masks = [shift(m, *self.label_shift) for m in self.masks]
                if self.weights is not None:
                    self.weights = [shift(w, *self.label_shift) for w in self.weights]
        self.transform = transform
        self.in_channels = in_channels
        self.length = length or len(pairs)
        self.seed = seed
        self.epoch = 0
        self._order: np.ndarray | None = None
        self._local = threading.local()  # one copy of the transform per worker thread

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s sample order and augmentation (see the class docstring)."""
        self.epoch = epoch
        if self.seed is not None:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.length)

    def __len__(self) -> int:
        return self.length

    def _seeded_transform(self, index: int) -> A.Compose:
        transform = getattr(self._local, "transform", None)
        if transform is None:
            transform = self._local.transform = copy.deepcopy(self.transform)
        state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
        transform.set_random_seed(int(state))
        return transform

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._order is not None:
            index = int(self._order[index])
        k = index % len(self.images)
        transform = self.transform if self.seed is None else self._seeded_transform(index)
        if self.weights is None:
            out = transform(image=self.images[k], mask=self.masks[k])
            return to_network_input(out["image"], self.in_channels), out["mask"].astype(np.float32)[None]
        out = transform(image=self.images[k], masks=[self.masks[k], self.weights[k]])
        mask = np.stack([m.astype(np.float32) for m in out["masks"]])
        return to_network_input(out["image"], self.in_channels), mask


def create_dataset(source: SegmentationSource, batch_size: int, shuffle: bool, num_workers: int = 1,
                   drop_remainder: bool = False, seed: int | None = None, *,
                   num_shards: int | None = None, shard_id: int | None = None):
    """A batched ``mindspore.dataset.GeneratorDataset`` over ``source`` with ``num_workers``
    parallel workers, so that augmentation overlaps the training step. With ``num_shards``, the
    ``shard_id``-th of that many disjoint parts of ``source`` (data-parallel ranks; with the same
    ``seed`` on every rank the shuffled parts stay disjoint)."""
    import mindspore.dataset as ds

    if seed is not None:
        ds.config.set_seed(seed)
    shards = {} if num_shards is None or num_shards == 1 else {"num_shards": num_shards, "shard_id": shard_id}
    dataset = ds.GeneratorDataset(source, column_names=["image", "mask"], shuffle=shuffle,
                                  num_parallel_workers=num_workers, python_multiprocessing=False, **shards)
    return dataset.batch(batch_size, drop_remainder=drop_remainder)
