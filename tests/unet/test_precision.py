"""int8 models (unet/export.py): what calibration sees, what the quantized graph holds, and the
one-line errors of the precision option. No MindSpore: the graph is built from weights drawn here
(int8 accuracy needs trained weights: tests/flows/test_segment.py tests the smoke champion's)."""
from __future__ import annotations

import json

import cv2
import numpy as np
import onnx
import pytest

from unet.backends import check_precision, load_exported, load_predictor
from unet.data import to_network_input
from unet.export import FLOAT_NODES, INT8_FILE, SIDECAR, model_file, network_inputs, quantize_int8, unet_onnx
from unet.recipes import PRESETS


def random_weights(in_channels: int, base: int, seed: int = 0) -> dict[str, np.ndarray]:
    """He-initialised convolutions and BatchNorm statistics of a UNet (names as unet.model.UNet)."""
    rng = np.random.default_rng(seed)
    b = base
    shapes = {"enc1": (in_channels, b), "enc2": (b, 2 * b), "enc3": (2 * b, 4 * b), "enc4": (4 * b, 8 * b),
              "bottom": (8 * b, 16 * b), "up1.conv": (24 * b, 8 * b), "up2.conv": (12 * b, 4 * b),
              "up3.conv": (6 * b, 2 * b), "up4.conv": (3 * b, b)}
    weights = {}
    for prefix, (cin, cout) in shapes.items():
        for conv, bn, c in ((0, 1, cin), (3, 4, cout)):
            weights[f"{prefix}.block.{conv}.weight"] = rng.normal(0, np.sqrt(2 / (9 * c)), (cout, c, 3, 3))
            weights[f"{prefix}.block.{bn}.gamma"] = rng.uniform(0.5, 1.5, cout)
            weights[f"{prefix}.block.{bn}.beta"] = rng.normal(0, 0.1, cout)
            weights[f"{prefix}.block.{bn}.moving_mean"] = rng.normal(0, 0.1, cout)
            weights[f"{prefix}.block.{bn}.moving_variance"] = rng.uniform(0.5, 2, cout)
    weights["head.weight"] = rng.normal(0, 1 / np.sqrt(b), (1, b, 1, 1))
    weights["head.bias"] = np.zeros(1)
    return {k: v.astype(np.float32) for k, v in weights.items()}


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    recipe = PRESETS["fullres"].replace(base_channels=8)
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    path.write_bytes(unet_onnx(random_weights(1, 8), recipe).SerializeToString())
    return recipe, path


def test_calibration_sees_what_inference_feeds_the_network(frames):
    frame = cv2.imread(str(frames["train"][0][0]), cv2.IMREAD_GRAYSCALE)
    smoke = PRESETS["smoke"]
    np.testing.assert_array_equal(network_inputs(frame, smoke),
                                  to_network_input(cv2.resize(frame, (64, 64), interpolation=cv2.INTER_LINEAR), 1)[None])
    crop = PRESETS["fullres"]
    odd = frame[:300, :420]
    x = network_inputs(odd, crop)
    assert x.shape == (1, 1, 304, 432) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0, 0, :300, :420], odd / np.float32(255))
    np.testing.assert_array_equal(x[0, 0, 300:, :420], x[0, 0, 298:294:-1, :420])  # mirrored, as OnnxPredictor pads


def test_int8_graph_quantizes_the_body_per_channel_and_keeps_head_and_sigmoid_float(float_model, frames, tmp_path):
    recipe, path = float_model
    train = [cv2.imread(str(image), cv2.IMREAD_GRAYSCALE)[:128, :128] for image, _ in frames["train"][:3]]
    quantize_int8(path, tmp_path / INT8_FILE, [network_inputs(f, recipe) for f in train])
    model = onnx.load(str(tmp_path / INT8_FILE))
    nodes = {n.name: n for n in model.graph.node}
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    # every 3x3 convolution reads 8-bit activations and per-output-channel int8 weights
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.name not in FLOAT_NODES]
    assert len(convs) == 18
    for conv in convs:
        act, weight = (producers[name] for name in conv.input[:2])
        assert act.op_type == weight.op_type == "DequantizeLinear"
        assert inits[weight.input[0]].dtype == np.int8
        assert inits[weight.input[1]].shape == (inits[weight.input[0]].shape[0],)  # one scale per channel
        assert inits[act.input[2]].dtype == np.uint8  # the activation's zero point: uint8 activations
    # the head and the sigmoid compute in float32 on a dequantized input
    assert inits[nodes["logit"].input[1]].dtype == np.float32
    assert producers[nodes["logit"].input[0]].op_type == "DequantizeLinear"
    assert producers["prob"].op_type == "Sigmoid"


def test_precision_errors_are_one_line(tmp_path, float_model):
    with pytest.raises(ValueError, match=r"unknown precision 'fp16'; expected one of fp32, int8"):
        check_precision("fp16")
    with pytest.raises(ValueError, match="precision int8 runs on onnxruntime, not mindspore"):
        check_precision("int8", "mindspore")
    with pytest.raises(ValueError, match="int8 needs an export of the model"):
        load_predictor(tmp_path / "best.ckpt", PRESETS["smoke"], "onnxruntime", precision="int8")
    with pytest.raises(ValueError, match="unknown calibration method 'kl'"):
        quantize_int8(float_model[1], tmp_path / "x.onnx", [np.zeros((1, 1, 64, 64), np.float32)], "kl")
    with pytest.raises(ValueError, match="no calibration frames"):
        quantize_int8(float_model[1], tmp_path / "x.onnx", [])
    with pytest.raises(FileNotFoundError, match="expected an export folder"):
        model_file(tmp_path)
    (tmp_path / SIDECAR).write_text(json.dumps({"files": {"onnx": "model.onnx", "onnx_int8": None}}))
    with pytest.raises(ValueError, match="the export has no int8 model"):
        load_exported(tmp_path, "int8")
    with pytest.raises(FileNotFoundError, match="fp32 ONNX model is missing"):
        model_file(tmp_path, "fp32")
