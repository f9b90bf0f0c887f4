"""The trained UNet as an ONNX graph, written from its weights with the ``onnx`` package.

``mindspore.export(..., file_format="ONNX")`` cannot export this network: MindSpore 2.10 has no ONNX
converter for its bilinear resize ("the ResizeBilinearV2 operator in your model is not support for
exporting onnx"). The graph here is :class:`unet.model.UNet` node for node: each 3x3 convolution
with its BatchNorm folded in (inference statistics: w * gamma / sqrt(var + eps), beta - mean * gamma /
sqrt(var + eps)), ReLU, 2x2 max-pooling, 2x bilinear upsampling (half-pixel centres, as
``ops.interpolate(..., align_corners=False)``), concatenation with the skip, the 1x1 head and the
sigmoid: [N, C, H, W] -> cell probability [N, 1, H, W], H and W multiples of 16 (the predictor
mirrors its input out to them, as the MindSpore network does inside).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from unet.recipes import Recipe

OPSET = 17
PRECISIONS = ("fp32", "int8")
BN_EPS = 1e-5  # mindspore.nn.BatchNorm2d's default, which unet.model uses


def check_precision(precision: str, backend: str = "onnxruntime", auto: bool = False) -> None:
    """ValueError unless ``precision`` is one of :data:`PRECISIONS` (or ``auto`` where ``auto``,
    which the caller resolves to one of them) and runs on ``backend``."""
    allowed = ("auto", *PRECISIONS) if auto else PRECISIONS
    if precision not in allowed:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(allowed)}")
    if precision == "int8" and backend != "onnxruntime":
        raise ValueError(f"precision int8 runs on onnxruntime, not {backend}")


def checkpoint_weights(checkpoint: Path | str) -> dict[str, np.ndarray]:
    """The parameters of a MindSpore checkpoint as float32 arrays (name -> array)."""
    import mindspore as ms

    return {name: p.asnumpy().astype(np.float32) for name, p in ms.load_checkpoint(str(checkpoint)).items()}


def parameter_shapes(recipe: Recipe) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of :class:`unet.model.UNet` for ``recipe`` (its checkpoint's
    names), without building the network."""
    b, c = recipe.base_channels, recipe.in_channels
    blocks = {"enc1": (c, b), "enc2": (b, 2 * b), "enc3": (2 * b, 4 * b), "enc4": (4 * b, 8 * b),
              "bottom": (8 * b, 16 * b), "up1.conv": (24 * b, 8 * b), "up2.conv": (12 * b, 4 * b),
              "up3.conv": (6 * b, 2 * b), "up4.conv": (3 * b, b)}
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix, (cin, cout) in blocks.items():
        for conv, bn, into in ((0, 1, cin), (3, 4, cout)):
            shapes[f"{prefix}.block.{conv}.weight"] = (cout, into, 3, 3)
            for name in ("moving_mean", "moving_variance", "gamma", "beta"):
                shapes[f"{prefix}.block.{bn}.{name}"] = (cout,)
    shapes["head.weight"], shapes["head.bias"] = (1, b, 1, 1), (1,)
    return shapes


def check_weights(weights: Mapping[str, np.ndarray], recipe: Recipe, source: Path | str) -> None:
    """ValueError naming ``source`` unless ``weights`` has every parameter of ``recipe``'s UNet in its
    shape (what ``load_param_into_net(strict_load=True)`` checks, without MindSpore's network)."""
    mismatch = (f"{source}: does not match the recipe {recipe.name!r} "
                f"(in_channels={recipe.in_channels}, base_channels={recipe.base_channels})")
    for name, shape in parameter_shapes(recipe).items():
        if name not in weights:
            raise ValueError(f"{mismatch}: missing parameters such as {name}")
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"{mismatch}: {name} has shape {tuple(weights[name].shape)}, expected {shape}")


def unet_onnx(weights: Mapping[str, np.ndarray], recipe: Recipe):
    """The ONNX model of the UNet of ``recipe`` with ``weights`` (:func:`checkpoint_weights`)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def double_conv(x: str, prefix: str) -> str:
        for conv, bn in ((0, 1), (3, 4)):
            w = weights[f"{prefix}.block.{conv}.weight"]
            gamma, beta = weights[f"{prefix}.block.{bn}.gamma"], weights[f"{prefix}.block.{bn}.beta"]
            mean, var = weights[f"{prefix}.block.{bn}.moving_mean"], weights[f"{prefix}.block.{bn}.moving_variance"]
            scale = gamma / np.sqrt(var + BN_EPS)
            name = f"{prefix}.{conv}"
            nodes.append(helper.make_node(
                "Conv", [x, const(f"{name}.w", (w * scale[:, None, None, None]).astype(np.float32)),
                         const(f"{name}.b", (beta - mean * scale).astype(np.float32))], [f"{name}.conv"],
                kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
            nodes.append(helper.make_node("Relu", [f"{name}.conv"], [f"{name}.relu"]))
            x = f"{name}.relu"
        return x

    def pool(x: str, name: str) -> str:
        nodes.append(helper.make_node("MaxPool", [x], [name], kernel_shape=[2, 2], strides=[2, 2]))
        return name

    def up(x: str, skip: str, prefix: str) -> str:
        nodes.append(helper.make_node("Resize", [x, "", const(f"{prefix}.scales", np.float32([1, 1, 2, 2]))],
                                      [f"{prefix}.up"], mode="linear",
                                      coordinate_transformation_mode="half_pixel"))
        nodes.append(helper.make_node("Concat", [skip, f"{prefix}.up"], [f"{prefix}.cat"], axis=1))
        return double_conv(f"{prefix}.cat", f"{prefix}.conv")

    e1 = double_conv("x", "enc1")
    e2 = double_conv(pool(e1, "p1"), "enc2")
    e3 = double_conv(pool(e2, "p2"), "enc3")
    e4 = double_conv(pool(e3, "p3"), "enc4")
    y = double_conv(pool(e4, "p4"), "bottom")
    y = up(y, e4, "up1")
    y = up(y, e3, "up2")
    y = up(y, e2, "up3")
    y = up(y, e1, "up4")
    nodes.append(helper.make_node("Conv", [y, const("head.w", weights["head.weight"]),
                                           const("head.b", weights["head.bias"])], ["logit"], kernel_shape=[1, 1]))
    nodes.append(helper.make_node("Sigmoid", ["logit"], ["prob"]))
    for node in nodes:  # named after their outputs: quantization excludes nodes by name
        node.name = node.output[0]
    graph = helper.make_graph(
        nodes, f"unet-{recipe.name}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", recipe.in_channels, "H", "W"])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 1, "H", "W"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="unet-isbi", doc_string=f"UNet {recipe.name}: cell probability")
    model.ir_version = 8  # readable by every ONNX Runtime of the last years
    onnx.checker.check_model(model)
    return model


SIDECAR = "model.json"
INT8_FILE = "model.int8.onnx"
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
CALIBRATION = "minmax"  # measured on val scores, benchmarks/precision.py (benchmarks/README.md)
# Kept in float32: the 1x1 head and the sigmoid. 8-bit logits or probabilities would move in steps
# of about 1/255 of their range, coarser than the differences the scores resolve.
FLOAT_NODES = ("logit", "prob")


def write_export(checkpoint: Path | str, recipe: Recipe, out_dir: Path | str, sidecar: dict,
                 calibration_frames: Sequence[np.ndarray] = (), calibration: str = CALIBRATION,
                 int8_check: Callable[[Path], dict] | None = None) -> dict:
    """``out_dir/model.onnx`` (:func:`unet_onnx`, dynamic batch and size), ``model.int8.onnx``
    (:func:`quantize_int8` calibrated on ``calibration_frames``, the model's training frames as
    uint8 arrays; none given: no int8 model; ``int8_check(path)``, when given, scores it and its
    result goes to model.json's ``int8.check``), ``model.mindir`` (``mindspore.export``; MindSpore 2.10
    exports this network only at a fixed input shape: the recipe's training size for resize recipes,
    512 x 512 for native-resolution ones) and, last, ``model.json``: ``sidecar`` plus the files,
    their sha256 and the input rules. Every file goes through a temporary name, so a reader never
    sees a half-written export. Returns the sidecar."""
    import hashlib
    import json
    import os

    import mindspore as ms

    from unet.checkpoint import load_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = load_model(checkpoint, recipe)  # checks that the checkpoint matches the recipe
    onnx_model = unet_onnx(checkpoint_weights(checkpoint), recipe)
    tmp = out / ".model.onnx.tmp"
    tmp.write_bytes(onnx_model.SerializeToString())
    os.replace(tmp, out / "model.onnx")
    if calibration_frames:
        tmp = out / f".{INT8_FILE}.tmp"
        quantize_int8(out / "model.onnx", tmp, [network_inputs(f, recipe) for f in calibration_frames], calibration)
        os.replace(tmp, out / INT8_FILE)
    else:
        (out / INT8_FILE).unlink(missing_ok=True)  # an older export's: not of these weights
    side = recipe.image_size if recipe.input_mode == "resize" else 512
    shape = [1, recipe.in_channels, side, side]
    ms.export(net, ms.Tensor(np.zeros(shape, np.float32)), file_name=str(out / ".model.tmp"), file_format="MINDIR")
    os.replace(out / ".model.tmp.mindir", out / "model.mindir")
    os.chmod(out / "model.mindir", 0o644)  # mindspore.export writes it read-only for its owner

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    record = {
        **sidecar,
        "recipe": recipe.to_dict(),
        "input": {"channels": recipe.in_channels, "sections": recipe.sections, "multiple_of": 16,
                  "normalization": "uint8 pixels / 255 as float32, the grey frame repeated per channel",
                  "layout": "N, C, H, W", "output": "cell probability [N, 1, H, W] (sigmoid applied)",
                  "resize_to": recipe.image_size if recipe.input_mode == "resize" else None},
        "files": {"onnx": "model.onnx", "onnx_int8": INT8_FILE if calibration_frames else None,
                  "mindir": "model.mindir", "mindir_input_shape": shape},
        "int8": {"format": "QDQ", "weights": "int8, per output channel", "activations": "uint8",
                 "calibration": calibration, "calibration_frames": len(calibration_frames),
                 "float32_nodes": list(FLOAT_NODES),
                 "check": int8_check(out / INT8_FILE) if int8_check else None} if calibration_frames else None,
        "sha256": {"checkpoint": digest(Path(checkpoint)), "onnx": digest(out / "model.onnx"),
                   **({"onnx_int8": digest(out / INT8_FILE)} if calibration_frames else {}),
                   "mindir": digest(out / "model.mindir")},
    }
    tmp = out / f".{SIDECAR}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, out / SIDECAR)
    return record


# ---- int8 ----------------------------------------------------------------------------------------

def network_inputs(frame: np.ndarray, recipe: Recipe) -> np.ndarray:
    """What the network sees of ``frame`` (uint8 [H, W], or [H, W, sections]) at inference without
    TTA, as the block engine builds it: float32 [1, C, h, w], h and w mirrored out to multiples of
    16 (resize recipes: the frame at the training size; crop recipes: the whole frame)."""
    from unet.blocks import Settings, predict_region

    seen = []

    def record(batch: np.ndarray) -> np.ndarray:
        seen.append(batch)
        return np.zeros((len(batch), *batch.shape[-2:]), np.float32)

    predict_region(record, frame, Settings(recipe))
    (batch,) = seen
    h, w = batch.shape[-2:]
    return np.pad(batch, ((0, 0), (0, 0), (0, -h % 16), (0, -w % 16)), mode="reflect")


def quantize_int8(onnx_path: Path | str, out_path: Path | str, inputs: list[np.ndarray],
                  method: str = CALIBRATION) -> None:
    """Static int8 quantization of the float model ``onnx_path`` into ``out_path`` (ONNX Runtime,
    QDQ format): weights int8 per output channel, activations uint8 (the fast pair on CPUs with
    VNNI), activation ranges calibrated on ``inputs`` (:func:`network_inputs` of training frames)
    by ``method``: ``minmax`` (the observed range), ``entropy`` (the range that keeps the
    histogram's KL divergence smallest) or ``percentile`` (99.999 % of the values). The head and
    the sigmoid stay float32 (:data:`FLOAT_NODES`). Calibration goes one frame at a time, so its
    memory is one frame's activations whatever the number of frames."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {', '.join(methods)}")
    if not inputs:
        raise ValueError("no calibration frames: int8 quantization needs the model's training frames")

    class Frames(CalibrationDataReader):
        """The inputs one at a time; ``set_range`` selects the slice quantize_static collects next."""

        def __init__(self) -> None:
            self.set_range(0, len(inputs))

        def __len__(self) -> int:
            return len(inputs)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.pending = iter(inputs[start_index:end_index])

        def get_next(self) -> dict | None:
            x = next(self.pending, None)
            return None if x is None else {"x": x}

    quantize_static(str(onnx_path), str(out_path), Frames(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=methods[method],
                    nodes_to_exclude=list(FLOAT_NODES), extra_options={"CalibStridedMinMax": 1})


def model_file(folder: Path | str, precision: str = "fp32") -> Path:
    """The ONNX file of the export in ``folder`` at ``precision`` (model.json names it); one-line
    errors for a folder without model.json, an unknown precision or an export without int8."""
    import json

    check_precision(precision)
    sidecar = Path(folder) / SIDECAR
    if not sidecar.is_file():
        raise FileNotFoundError(f"{sidecar}: not found; expected an export folder of flows/export.py")
    name = json.loads(sidecar.read_text())["files"].get("onnx" if precision == "fp32" else "onnx_int8")
    if name is None:
        raise ValueError(f"{folder}: the export has no int8 model (exported without its training frames, or "
                         "before int8 existed); export it again with flows/export.py")
    path = Path(folder) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the export's {precision} ONNX model is missing")
    return path
