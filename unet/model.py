"""The UNet of the MindSpore case: same-padding double convs, 4 max-pool downs, bilinear ups.

Shapes for ``base_channels=b`` and an input [N, C, H, W] (H, W any size; padded to a multiple of
16 inside and cropped back):

    enc1 [N, b, H, W] -> enc2 [N, 2b, H/2] -> enc3 [N, 4b, H/4] -> enc4 [N, 8b, H/8]
    -> bottom [N, 16b, H/16] -> up x4 with skip concatenation -> [N, b, H, W] -> 1x1 conv [N, 1, H, W]

The network returns logits; ``ops.sigmoid`` gives the cell probability. With ``in_channels=3,
base_channels=64`` it is the case's network (31.4 M trainable parameters).
"""
from __future__ import annotations

import unet  # noqa: F401  (sets the oneDNN ISA cap before mindspore loads)

import mindspore.nn as nn
import mindspore.ops as ops

DEPTH = 4
MULTIPLE = 2**DEPTH  # spatial sizes inside the network must be multiples of this


class DoubleConv(nn.Cell):
    """(3x3 conv, same padding, no bias -> BatchNorm -> ReLU) x 2: [N, cin, H, W] -> [N, cout, H, W]."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = nn.SequentialCell(
            nn.Conv2d(in_channels, out_channels, 3, pad_mode="same"),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, pad_mode="same"),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )

    def construct(self, x):
        return self.block(x)


class Up(nn.Cell):
    """Bilinear 2x upsampling of ``x`` to the size of ``skip``, concatenation, DoubleConv."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = DoubleConv(in_channels + skip_channels, out_channels)

    def construct(self, x, skip):
        x = ops.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
        return self.conv(ops.concat((skip, x), axis=1))


class UNet(nn.Cell):
    """UNet-2D returning one logit channel: [N, in_channels, H, W] -> [N, 1, H, W]."""

    def __init__(self, in_channels: int = 3, base_channels: int = 64) -> None:
        super().__init__()
        if in_channels < 1 or base_channels < 1:
            raise ValueError(f"in_channels and base_channels must be >= 1, got {in_channels}, {base_channels}")
        b = base_channels
        self.in_channels = in_channels
        self.enc1 = DoubleConv(in_channels, b)
        self.enc2 = DoubleConv(b, 2 * b)
        self.enc3 = DoubleConv(2 * b, 4 * b)
        self.enc4 = DoubleConv(4 * b, 8 * b)
        self.bottom = DoubleConv(8 * b, 16 * b)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.up1 = Up(16 * b, 8 * b, 8 * b)
        self.up2 = Up(8 * b, 4 * b, 4 * b)
        self.up3 = Up(4 * b, 2 * b, 2 * b)
        self.up4 = Up(2 * b, b, b)
        self.head = nn.Conv2d(b, 1, 1, has_bias=True)

    def construct(self, x):
        h, w = x.shape[2], x.shape[3]
        pad_h = (MULTIPLE - h % MULTIPLE) % MULTIPLE
        pad_w = (MULTIPLE - w % MULTIPLE) % MULTIPLE
        if pad_h or pad_w:
            x = ops.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        e4 = self.enc4(self.pool(e3))
        y = self.bottom(self.pool(e4))
        y = self.up1(y, e4)
        y = self.up2(y, e3)
        y = self.up3(y, e2)
        y = self.up4(y, e1)
        y = self.head(y)
        return y[:, :, :h, :w]


def count_parameters(net: nn.Cell) -> int:
    """Number of trainable scalars of ``net``."""
    return sum(int(p.size) for p in net.trainable_params())
