"""Training recipes: typed, frozen configuration. Presets are data, not code paths."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Augmentation = Literal["case", "fullres", "none"]


@dataclass(frozen=True)
class Recipe:
    """Everything that decides what a training run produces.

    ``image_size`` is the side of the square the network sees in training: for ``resize`` recipes
    the whole frame is resized to it (the case); for ``crop`` recipes random crops of that side are
    cut from the native-resolution frame, and inference runs on whole native frames.
    """

    name: str
    in_channels: int = 3
    base_channels: int = 64
    image_size: int = 224
    input_mode: Literal["resize", "crop"] = "resize"
    augmentation: Augmentation = "case"
    batch_size: int = 4
    val_batch_size: int = 2
    epochs: int = 50
    steps_per_epoch: int = 0  # 0: one pass over the training frames (the case)
    learning_rate: float = 1e-3
    weight_decay: float = 1e-6
    lr_schedule: Literal["constant", "cosine"] = "constant"
    loss: Literal["bce", "bce_dice"] = "bce"
    # U-Net boundary weighting of the BCE term (Ronneberger et al. 2015, eq. 2): each pixel weighs
    # 1 + boundary_weight * exp(-(d1 + d2)^2 / (2 boundary_sigma^2)), d1, d2 its distances to the
    # nearest and second-nearest cell; 0 turns it off. Thin membranes between cells weigh most.
    boundary_weight: float = 0.0
    boundary_sigma: float = 5.0
    # Shift the training labels onto their images' membranes before augmentation, by the offset
    # estimated from the training frames themselves (unet.data.label_offset). ISBI's labels sit
    # about (-0.5, -0.25) px off their images; flips and rotations turn a fixed offset into a blur
    # in every direction. The evaluate stage's alignment shifts the predictions back onto the labels.
    # Measured on fullres: the same val scores as without it (docs/results.md#registered-labels).
    register_labels: bool = False
    # How many consecutive sections the network sees: 1, the frame alone; 3, the frame between the
    # sections before and after it in its stack, as three input channels (2.5D; needs in_channels 3).
    # ISBI's frames are consecutive 50 nm sections: a membrane is a sheet through them, an organelle's
    # edge usually is not. Neighbours of train and val frames are the other frames of the train stack
    # (their images only), the test frames' are the test stack's (unet.data.read_sections).
    sections: int = 1
    tta: bool = False
    seed: int = 0
    num_workers: int = 2

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.val_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_size} / {self.val_batch_size}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.sections not in (1, 3):
            raise ValueError(f"sections must be 1 or 3, got {self.sections}")
        if self.sections == 3 and self.in_channels != 3:
            raise ValueError(f"sections 3 needs in_channels 3 (one per section), got {self.in_channels}")
        if self.base_channels < 1:
            raise ValueError(f"base_channels must be >= 1, got {self.base_channels}")
        if self.image_size < 16 or self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 and >= 16, got {self.image_size}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.boundary_weight < 0 or self.boundary_sigma <= 0:
            raise ValueError(f"boundary_weight must be >= 0 and boundary_sigma > 0, got "
                             f"{self.boundary_weight} / {self.boundary_sigma}")
        if self.boundary_weight > 0 and self.loss != "bce_dice":
            raise ValueError(f"boundary_weight needs loss 'bce_dice', got loss {self.loss!r}")
        if self.steps_per_epoch < 0:
            raise ValueError(f"steps_per_epoch must be >= 0, got {self.steps_per_epoch}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")

    def replace(self, **changes: Any) -> "Recipe":
        """A copy with some fields changed (``None`` values are ignored), validated again."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown recipe fields: {sorted(unknown)}")
        return cls(**data)


PRESETS: dict[str, Recipe] = {
    # The MindSpore case, exactly: grey frames read as 3 channels, resized to 224, batch 4/2,
    # 50 epochs, its augmentations, BCE, Adam lr 1e-3 (the code's value; the text says 0.01), wd 1e-6.
    "seed": Recipe(name="seed"),
    # Tiny and fast, for tests and demos: real frames resized to 64x64, base 8 channels,
    # 5 epochs of 10 steps (enough for BatchNorm's running statistics to settle).
    "smoke": Recipe(
        name="smoke", in_channels=1, base_channels=8, image_size=64, epochs=5, steps_per_epoch=10,
        batch_size=4, val_batch_size=5, learning_rate=3e-3, num_workers=1,
    ),
    # Native resolution: random crops of the 512 frames, 1 channel, U-Net boundary weights,
    # whole-frame inference with TTA; 50 x 40 steps of batch 4 train in about 90 min on 2 cores
    # (docs/results.md).
    "fullres": Recipe(
        name="fullres", in_channels=1, base_channels=32, image_size=256, input_mode="crop",
        augmentation="fullres", batch_size=4, val_batch_size=2, epochs=50, steps_per_epoch=40,
        learning_rate=1e-3, weight_decay=1e-6, lr_schedule="cosine", loss="bce_dice",
        boundary_weight=10.0, boundary_sigma=5.0, tta=True,
    ),
}


def get_preset(name: str) -> Recipe:
    """The preset called ``name``; a clear error for unknown names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None
