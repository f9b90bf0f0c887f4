"""A trained UNet from its MindSpore checkpoint, checked against its recipe."""
from __future__ import annotations

from pathlib import Path

import unet  # noqa: F401  (sets the oneDNN ISA cap before mindspore loads)
from unet.recipes import Recipe


def load_model(checkpoint: Path | str, recipe: Recipe):
    """The :class:`unet.model.UNet` of ``recipe`` with weights from ``checkpoint``, in inference mode."""
    import mindspore as ms

    from unet.model import UNet

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: checkpoint not found")
    ms.set_context(mode=ms.GRAPH_MODE)
    net = UNet(recipe.in_channels, recipe.base_channels)
    mismatch = (f"{checkpoint}: does not match the recipe {recipe.name!r} "
                f"(in_channels={recipe.in_channels}, base_channels={recipe.base_channels})")
    try:
        missing, _ = ms.load_param_into_net(net, ms.load_checkpoint(str(checkpoint)), strict_load=True)
    except RuntimeError as exc:  # mindspore reports a shape mismatch as RuntimeError
        raise ValueError(f"{mismatch}: {str(exc).splitlines()[0]}") from None
    if missing:
        raise ValueError(f"{mismatch}: missing {len(missing)} parameters such as {missing[0]}")
    net.set_train(False)
    return net
