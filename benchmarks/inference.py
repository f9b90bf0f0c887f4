"""Native-size inference speed: 512x512 frames per second through the pipeline's inference path
(``unet.infer.predict_frame``, the block engine), with and without 8-fold test-time augmentation,
on MindSpore and on ONNX Runtime (the same weights as an ONNX graph, unet/export.py), the network's
GFLOP/s, and peak memory.

    .venv/bin/python benchmarks/inference.py --preset seed --frames 5
    .venv/bin/python benchmarks/inference.py --preset fullres --frames 5 --backend mindspore onnxruntime
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import common

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="seed")
    p.add_argument("--frames", type=int, default=5, help="timed frames (after one warm-up frame)")
    p.add_argument("--size", type=int, default=512, help="frame side")
    p.add_argument("--backend", nargs="+", default=["mindspore"], choices=["mindspore", "onnxruntime"])
    args = p.parse_args()

    import tempfile

    import mindspore as ms

    from unet.backends import load_predictor
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
    for backend in args.backend:
        net = load_predictor(checkpoint, recipe, backend)
        result = {"benchmark": "inference", "preset": args.preset, "backend": backend,
                  "frame": [args.size, args.size], "input_mode": recipe.input_mode,
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
