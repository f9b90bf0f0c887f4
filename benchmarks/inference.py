"""Native-size inference speed: 512x512 frames per second through the pipeline's inference path
(``unet.infer.predict_frame``, the block engine), with and without 8-fold test-time augmentation,
on MindSpore and on ONNX Runtime (the same weights as an ONNX graph, unet/export.py), the network's
GFLOP/s, and peak memory.

    .venv/bin/python benchmarks/inference.py --preset seed --frames 5
    .venv/bin/python benchmarks/inference.py --preset fullres --frames 5 --backend mindspore onnxruntime
    .venv/bin/python benchmarks/inference.py --preset fullres --backend onnxruntime --precision fp32 int8

int8 (ONNX Runtime only): the untrained network quantized by unet.export.quantize_int8, calibrated
on the first ``--calibration-frames`` real frames of ``--data-dir``/train-volume.tif (speed does
not depend on the weights; accuracy: benchmarks/precision.py).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import common

import numpy as np


def int8_model(checkpoint: Path, recipe, args) -> Path:
    """The checkpoint's network as an int8 ONNX model, calibrated on real frames; its path."""
    import tifffile

    from unet.export import checkpoint_weights, network_inputs, quantize_int8, unet_onnx

    folder = checkpoint.parent
    (folder / "model.onnx").write_bytes(unet_onnx(checkpoint_weights(checkpoint), recipe).SerializeToString())
    frames = tifffile.imread(Path(args.data_dir) / "train-volume.tif")[:args.calibration_frames]
    quantize_int8(folder / "model.onnx", folder / "model.int8.onnx", [network_inputs(f, recipe) for f in frames])
    return folder / "model.int8.onnx"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="seed")
    p.add_argument("--frames", type=int, default=5, help="timed frames (after one warm-up frame)")
    p.add_argument("--size", type=int, default=512, help="frame side")
    p.add_argument("--backend", nargs="+", default=["mindspore"], choices=["mindspore", "onnxruntime"])
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "int8"],
                   help="int8: ONNX Runtime only")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: one per core)")
    p.add_argument("--data-dir", default=str(common.REPO.parent / "shared" / "data" / "isbi2012"),
                   help="int8 calibration frames: train-volume.tif here")
    p.add_argument("--calibration-frames", type=int, default=4)
    args = p.parse_args()

    import tempfile

    import mindspore as ms

    from unet.backends import OnnxPredictor, load_predictor
    from unet.infer import predict_frame
    from unet.model import UNet
    from unet.recipes import get_preset

    recipe = get_preset(args.preset)
    ms.set_seed(0)
    checkpoint = Path(tempfile.mkdtemp()) / "untrained.ckpt"  # speed does not depend on the weights
    ms.save_checkpoint(UNet(recipe.in_channels, recipe.base_channels), str(checkpoint))
    frame = np.random.default_rng(0).integers(0, 256, (args.size, args.size), dtype=np.uint8)
    side = recipe.image_size if recipe.input_mode == "resize" else args.size
    gflop = common.unet_forward_flops(recipe.in_channels, recipe.base_channels, side, side) / 1e9
    runs = [(b, "fp32") for b in args.backend if "fp32" in args.precision]
    runs += [("onnxruntime", "int8")] if "int8" in args.precision else []
    for backend, precision in runs:
        if precision == "int8":
            net = OnnxPredictor(int8_model(checkpoint, recipe, args), args.threads)
        else:
            net = load_predictor(checkpoint, recipe, backend, args.threads)
        result = {"benchmark": "inference", "preset": args.preset, "backend": backend, "precision": precision,
                  "threads": args.threads, "frame": [args.size, args.size], "input_mode": recipe.input_mode,
                  "gflop_per_forward": round(gflop, 1)}
        for tta in (False, True):
            predict_frame(net, frame, recipe, tta=tta)  # compile
            t0 = time.perf_counter()
            for _ in range(args.frames):
                predict_frame(net, frame, recipe, tta=tta)
            per_frame = (time.perf_counter() - t0) / args.frames
            name = "tta8" if tta else "plain"
            result[f"{name}_s_per_frame"] = round(per_frame, 3)
            result[f"{name}_frames_per_s"] = round(1 / per_frame, 2)
            result[f"{name}_gflop_per_s"] = round(gflop * (8 if tta else 1) / per_frame, 1)
        result["peak_rss_mib"] = common.peak_rss_mib()
        common.emit(result)


if __name__ == "__main__":
    main()
