"""One forward pass of the UNet, nothing around it: MindSpore (graph mode, the AVX2 cap of
unet/__init__.py), ONNX Runtime fp32 and int8 (the graphs unet/export.py writes) and, when its
Python is given, PyTorch CPU (the same architecture, for reference; not a project dependency), at
batch 1 and 8, as seconds per image, GFLOP/s and the share of this CPU's fp32 peak (cores x 64 fp32
FLOP per cycle with two full-width AVX-512 FMA units x the clock). The clock: ``--clock-ghz``, else
what /proc/cpuinfo reports, which on this VM is the nominal 2.6 GHz while a busy core runs at about
4.2 (``gcc -O1 -o /tmp/clock benchmarks/clock.c && /tmp/clock``: a chain of dependent adds).

    .venv/bin/python benchmarks/forward.py --preset fullres --repeats 5 --clock-ghz 4.2
    .venv/bin/python benchmarks/forward.py --preset fullres --torch-python /work/torchvenv/bin/python

Untrained weights (speed does not depend on them); int8 is calibrated on 4 real frames. Each
number is the median of ``--repeats`` timed calls after one warm-up call.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

import numpy as np

# PyTorch's copy of unet.model.UNet (DoubleConv = conv3x3-BN-ReLU x 2, max-pool, bilinear 2x
# upsampling with half-pixel centres, skip first in the concatenation, 1x1 head, sigmoid). Run in
# the other interpreter: prints the median seconds per call.
TORCH_CODE = r"""
import json, statistics, sys, time
import torch
from torch import nn
base, channels, side, batch, repeats, threads = json.loads(sys.argv[1])
torch.set_num_threads(threads)
def double(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
class UNet(nn.Module):
    def __init__(self, c, b):
        super().__init__()
        self.enc = nn.ModuleList([double(c, b), double(b, 2 * b), double(2 * b, 4 * b), double(4 * b, 8 * b)])
        self.bottom = double(8 * b, 16 * b)
        self.dec = nn.ModuleList([double(24 * b, 8 * b), double(12 * b, 4 * b), double(6 * b, 2 * b), double(3 * b, b)])
        self.head = nn.Conv2d(b, 1, 1)
    def forward(self, x):
        skips = []
        for enc in self.enc:
            x = enc(x); skips.append(x); x = nn.functional.max_pool2d(x, 2)
        x = self.bottom(x)
        for dec, skip in zip(self.dec, reversed(skips)):
            x = dec(torch.cat([skip, nn.functional.interpolate(x, scale_factor=2, mode="bilinear")], 1))
        return torch.sigmoid(self.head(x))
net = UNet(channels, base).eval()
x = torch.rand(batch, channels, side, side)
with torch.inference_mode():
    net(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); net(x); times.append(time.perf_counter() - t0)
print(statistics.median(times))
"""


def cpuinfo_ghz() -> float:
    """The clock /proc/cpuinfo reports for the first core (GHz)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return float(line.split(":")[1]) / 1000
    raise RuntimeError("no 'cpu MHz' in /proc/cpuinfo")


def median_seconds(call, repeats: int) -> float:
    call()  # warm-up: graph compile, memory arenas
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="fullres")
    p.add_argument("--side", type=int, default=512, help="input side (a multiple of 16)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of every framework")
    p.add_argument("--frameworks", nargs="+", default=["mindspore", "onnxruntime-fp32", "onnxruntime-int8"],
                   choices=["mindspore", "onnxruntime-fp32", "onnxruntime-int8"])
    p.add_argument("--clock-ghz", type=float, help="the cores' clock under load (default: /proc/cpuinfo's)")
    p.add_argument("--torch-python", help="a Python with torch installed: adds PyTorch CPU rows")
    p.add_argument("--data-dir", default=str(common.REPO.parent / "shared" / "data" / "isbi2012"),
                   help="int8 calibration frames: train-volume.tif here")
    args = p.parse_args()

    import mindspore as ms
    from inference import int8_model

    from unet.backends import OnnxPredictor
    from unet.export import checkpoint_weights, unet_onnx
    from unet.model import UNet
    from unet.recipes import get_preset

    recipe = get_preset(args.preset)
    folder = Path(tempfile.mkdtemp())
    ms.set_seed(0)
    net = UNet(recipe.in_channels, recipe.base_channels)
    net.set_train(False)
    ms.save_checkpoint(net, str(folder / "untrained.ckpt"))
    if "onnxruntime-int8" in args.frameworks:  # writes model.onnx beside model.int8.onnx
        int8_model(folder / "untrained.ckpt", recipe, argparse.Namespace(data_dir=args.data_dir, calibration_frames=4))
    else:
        (folder / "model.onnx").write_bytes(unet_onnx(checkpoint_weights(folder / "untrained.ckpt"), recipe)
                                            .SerializeToString())

    gflop = common.unet_forward_flops(recipe.in_channels, recipe.base_channels, args.side, args.side) / 1e9
    clock = args.clock_ghz or cpuinfo_ghz()
    peak = os.cpu_count() * 64 * clock  # GFLOP/s
    print(f"UNet {args.preset} (in {recipe.in_channels}, base {recipe.base_channels}), {args.side}x{args.side}: "
          f"{gflop:.1f} GFLOP per image; fp32 peak {peak:.0f} GFLOP/s ({os.cpu_count()} cores x 64 FLOP/cycle x "
          f"{clock:.2f} GHz); {args.threads} threads, median of {args.repeats}")
    print("| framework | batch | s per call | s per image | GFLOP/s | share of fp32 peak |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    sessions = {}
    for batch in args.batches:
        x = rng.random((batch, recipe.in_channels, args.side, args.side), dtype=np.float32)
        rows = []
        for name in args.frameworks:
            if name == "mindspore":
                tensor = ms.Tensor(x)
                seconds = median_seconds(lambda: net(tensor).asnumpy(), args.repeats)
            else:
                model = folder / ("model.int8.onnx" if name.endswith("int8") else "model.onnx")
                sess = sessions.setdefault(name, OnnxPredictor(model, args.threads).session)  # the block engine's
                seconds = median_seconds(lambda: sess.run(["prob"], {"x": x}), args.repeats)
            rows.append((name, seconds))
        if args.torch_python:
            spec = json.dumps([recipe.base_channels, recipe.in_channels, args.side, batch, args.repeats, args.threads])
            done = subprocess.run([args.torch_python, "-c", TORCH_CODE, spec], capture_output=True, text=True,
                                  check=True)
            rows.append(("pytorch", float(done.stdout.split()[-1])))
        for name, seconds in rows:
            rate = gflop * batch / seconds
            print(f"| {name} | {batch} | {seconds:.3f} | {seconds / batch:.3f} | {rate:.0f} | {rate / peak:.0%} |")
            common.emit({"benchmark": "forward", "preset": args.preset, "framework": name, "batch": batch,
                         "side": args.side, "threads": args.threads, "seconds_per_call": round(seconds, 4),
                         "gflop_per_s": round(rate, 1), "share_of_fp32_peak": round(rate / peak, 3)})
        sys.stdout.flush()


if __name__ == "__main__":
    main()
