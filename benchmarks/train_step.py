"""Median seconds of one UNet training step (graph mode), images/s and achieved GFLOP/s.

    .venv/bin/python benchmarks/train_step.py --base-channels 64 --image-size 224 --batch-size 4 --steps 5
"""
from __future__ import annotations

import argparse
import statistics
import time

import common

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-channels", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up steps")
    p.add_argument("--loss", default="bce", choices=["bce", "bce_dice"])
    p.add_argument("--mode", default="graph", choices=["graph", "pynative"],
                   help="MindSpore execution mode (the pipeline trains in graph mode)")
    p.add_argument("--jit-level", choices=["O0", "O1", "O2"], help="graph-mode jit level (default: MindSpore's)")
    p.add_argument("--kernel-threads", type=int,
                   help="threads of MindSpore's own CPU kernels (mindspore.device_context.cpu.op_tuning."
                        "threads_num; MindSpore's default is 25)")
    args = p.parse_args()

    import mindspore as ms
    import mindspore.nn as nn

    from unet.model import UNet
    from unet.recipes import Recipe
    from unet.train import make_train_step

    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE)
    if args.jit_level:
        ms.set_context(jit_config={"jit_level": args.jit_level})
    if args.kernel_threads:
        ms.device_context.cpu.op_tuning.threads_num(args.kernel_threads)
    ms.set_seed(0)
    net = UNet(args.in_channels, args.base_channels)
    recipe = Recipe(name="bench", loss=args.loss)
    opt = nn.Adam(net.trainable_params(), learning_rate=1e-3, weight_decay=1e-6)
    step = make_train_step(net, recipe, opt)  # the pipeline's step: (loss, logits)
    step.set_train()
    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.in_channels, args.image_size, args.image_size)
    x = ms.Tensor(rng.random(shape, dtype=np.float32))
    y = ms.Tensor((rng.random((args.batch_size, 1, args.image_size, args.image_size)) > 0.5).astype(np.float32))
    t0 = time.perf_counter()
    step(x, y)[0].asnumpy()
    compile_s = time.perf_counter() - t0
    step(x, y)[0].asnumpy()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step(x, y)[0].asnumpy()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    flops = 3 * args.batch_size * common.unet_forward_flops(args.in_channels, args.base_channels,
                                                             args.image_size, args.image_size)
    common.emit({"benchmark": "train_step", **vars(args), "first_step_s": round(compile_s, 2),
                 "median_step_s": round(median, 3), "min_step_s": round(min(times), 3),
                 "images_per_s": round(args.batch_size / median, 2),
                 "step_tflop": round(flops / 1e12, 3), "achieved_gflops": round(flops / median / 1e9, 1),
                 "peak_rss_mib": common.peak_rss_mib()})


if __name__ == "__main__":
    main()
