"""Predictors: a trained network as a function from a float32 batch [N, C, H, W] to cell
probabilities [N, H, W], and the test-time augmentation (TTA) views averaged around it.

A predictor knows arrays only, not files, frames or blocks (:mod:`unet.blocks` cuts volumes into
what it sees). TTA levels: ``none`` (the input as it is), ``flips`` (4 views: as it is, flipped
left-right, up-down, both) and ``d4`` (the 8 flips and rotations, the dihedral group D4). Each view
is mapped back before the views are averaged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import unet  # noqa: F401  (sets the oneDNN ISA cap before mindspore loads)

import numpy as np

from unet.recipes import Recipe

# Indices k of :func:`d4` (k % 4 quarter turns, then a left-right flip when k >= 4) per TTA level.
TTA_VIEWS: dict[str, tuple[int, ...]] = {"none": (0,), "flips": (0, 4, 6, 2), "d4": tuple(range(8))}
# At most this many pixels go through the network in one call: the 8 views of a 512x512 frame
# form one batch (as before blocks existed), a larger block's views go a few at a time.
BATCH_PIXELS = 8 * 512 * 512


class Predictor(Protocol):
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Cell probabilities float32 [N, H, W] of a float32 batch [N, C, H, W]."""


def tta_level(tta: bool | str | None) -> str:
    """``True``/``False`` (a recipe's ``tta``) or a level name -> the level name; ValueError otherwise."""
    if tta is True:
        return "d4"
    if tta is False or tta is None:
        return "none"
    if tta not in TTA_VIEWS:
        raise ValueError(f"unknown TTA level {tta!r}; expected one of {', '.join(TTA_VIEWS)}")
    return tta


def d4(x: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 flips/rotations of the last two axes (k in 0..7)."""
    x = np.rot90(x, k % 4, axes=(-2, -1))
    return np.flip(x, axis=-1) if k >= 4 else x


def d4_inverse(x: np.ndarray, k: int) -> np.ndarray:
    """Undoes :func:`d4` with the same ``k``."""
    if k >= 4:
        x = np.flip(x, axis=-1)
    return np.rot90(x, -(k % 4), axes=(-2, -1))


def predict_views(predictor: Predictor, x: np.ndarray, tta: bool | str = "none") -> np.ndarray:
    """[C, H, W] float32 -> [H, W] float32 probabilities, averaged over the views of ``tta``.
    Views of one shape go through the predictor together, at most :data:`BATCH_PIXELS` at a time."""
    views = TTA_VIEWS[tta_level(tta)]
    groups: dict[tuple[int, ...], list[int]] = {}
    for k in views:  # a non-square input has two shapes: as it is and turned a quarter
        groups.setdefault(d4(x, k).shape, []).append(k)
    per_call = max(1, BATCH_PIXELS // (x.shape[-1] * x.shape[-2]))
    total = np.zeros(x.shape[-2:], np.float32)
    for ks in groups.values():
        for i in range(0, len(ks), per_call):
            chunk = ks[i:i + per_call]
            probs = predictor(np.ascontiguousarray(np.stack([d4(x, k) for k in chunk]), dtype=np.float32))
            for k, p in zip(chunk, probs):
                total += d4_inverse(p, k)
    return total / len(views) if len(views) > 1 else total


class MindSporePredictor:
    """A trained :class:`unet.model.UNet` (MindSpore, graph mode) as a :class:`Predictor`."""

    def __init__(self, net) -> None:
        self.net = net

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import mindspore as ms
        import mindspore.ops as ops

        out = ops.sigmoid(self.net(ms.Tensor(np.ascontiguousarray(batch, dtype=np.float32))))
        return out.asnumpy()[:, 0]


class OnnxPredictor:
    """An ONNX model of the UNet (:func:`unet.export.unet_onnx`) on ONNX Runtime's CPU provider as a
    :class:`Predictor`. Inputs are mirrored out to multiples of 16 and the output cropped back, as
    the MindSpore network does inside. ``threads``: intra-op threads (0: ONNX Runtime's default,
    one per core)."""

    def __init__(self, model, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        source = model if isinstance(model, (str, Path)) else model.SerializeToString()
        self.session = ort.InferenceSession(str(source) if isinstance(source, Path) else source, options,
                                            providers=["CPUExecutionProvider"])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        h, w = batch.shape[-2:]
        pad_h, pad_w = -h % 16, -w % 16
        if pad_h or pad_w:
            batch = np.pad(batch, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)), mode="reflect")
        # one image per run: batching gains nothing here (0.37 s vs 0.40 s per 512x512 image) and
        # multiplies the memory ONNX Runtime's arena keeps
        probs = [self.session.run(["prob"], {"x": np.ascontiguousarray(x[None], dtype=np.float32)})[0][0, 0]
                 for x in batch]
        return np.stack(probs)[:, :h, :w]


def as_predictor(model) -> Callable[[np.ndarray], np.ndarray]:
    """A :class:`Predictor` for ``model``: a MindSpore cell is wrapped, a predictor returned as is."""
    import mindspore.nn as nn

    return MindSporePredictor(model) if isinstance(model, nn.Cell) else model


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


BACKENDS = ("onnxruntime", "mindspore")
PRECISIONS = ("fp32", "int8")


def check_precision(precision: str, backend: str = "onnxruntime") -> None:
    """ValueError unless ``precision`` is one of :data:`PRECISIONS` and runs on ``backend``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "int8" and backend != "onnxruntime":
        raise ValueError(f"precision int8 runs on onnxruntime, not {backend}")


def load_predictor(checkpoint: Path | str, recipe: Recipe, backend: str = "mindspore", threads: int = 0,
                   precision: str = "fp32"):
    """The model of ``checkpoint`` as a :class:`Predictor` on ``backend``: MindSpore (:func:`load_model`)
    or ONNX Runtime (the graph :func:`unet.export.unet_onnx` writes from the checkpoint's weights,
    ``threads`` intra-op threads, 0 for one per core). The two agree to about 1e-6. ``precision``
    int8 needs the model calibrated on its training frames, which an export does
    (:func:`load_exported`): a checkpoint alone runs in fp32."""
    check_precision(precision, backend)
    if precision == "int8":
        raise ValueError(f"{checkpoint}: int8 needs an export of the model, calibrated on its training frames "
                         "(flows/export.py); a checkpoint runs in fp32")
    if backend == "mindspore":
        return MindSporePredictor(load_model(checkpoint, recipe))
    if backend == "onnxruntime":
        from unet.export import checkpoint_weights, unet_onnx

        load_model(checkpoint, recipe)  # the same checks: the file exists and matches the recipe
        return OnnxPredictor(unet_onnx(checkpoint_weights(checkpoint), recipe), threads)
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def load_exported(folder: Path | str, precision: str = "fp32", threads: int = 0) -> OnnxPredictor:
    """The export in ``folder`` (flows/export.py: model.json beside the ONNX files) at ``precision``
    on ONNX Runtime; ValueError when the export has no model of that precision."""
    from unet.export import model_file

    return OnnxPredictor(model_file(folder, precision), threads)
