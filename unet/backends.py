"""Predictors: a trained network as a function from a float32 batch [N, C, H, W] to cell
probabilities [N, H, W], on MindSpore or ONNX Runtime, loaded from a checkpoint or an export.

A predictor knows arrays only, not files, frames or blocks (:mod:`unet.blocks` cuts volumes into
what it sees); the test-time augmentation views around it are :mod:`unet.tta` (its names are
importable from here too).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import unet  # noqa: F401  (sets the oneDNN ISA cap before mindspore loads)

import numpy as np

from unet.checkpoint import load_model
from unet.export import PRECISIONS, check_precision  # noqa: F401  (part of this module's API)
from unet.recipes import Recipe
from unet.tta import BATCH_PIXELS, TTA_VIEWS, Predictor, d4, d4_inverse, predict_views, tta_level  # noqa: F401


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


BACKENDS = ("onnxruntime", "mindspore")
# The pipeline's evaluate and predict stages run their native-size predictions here: 3.8x faster than
# MindSpore on this CPU (benchmarks/README.md) and equal to it within 1e-5 (tests/flows/test_segment.py);
# training's own validation and the case metrics stay on MindSpore.
PIPELINE_BACKEND = "onnxruntime"


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
        from unet.export import check_weights, checkpoint_weights, unet_onnx

        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"{checkpoint}: checkpoint not found")
        weights = checkpoint_weights(checkpoint)
        check_weights(weights, recipe, checkpoint)  # as load_model checks, without building the network
        return OnnxPredictor(unet_onnx(weights, recipe), threads)
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def load_exported(folder: Path | str, precision: str = "fp32", threads: int = 0) -> OnnxPredictor:
    """The export in ``folder`` (flows/export.py: model.json beside the ONNX files) at ``precision``
    on ONNX Runtime; ValueError when the export has no model of that precision."""
    from unet.export import model_file

    return OnnxPredictor(model_file(folder, precision), threads)
