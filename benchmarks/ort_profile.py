"""Where one forward pass of an exported model spends its time in ONNX Runtime, by operator: ORT's
own profiler over ``--repeats`` passes of a 512x512 frame (after two warm-up passes), with the
session options the block engine uses (``unet.backends.OnnxPredictor``: ``--threads`` intra-op
threads, 0 = one per core; all graph optimizations). Tells what a faster int8 model could still
save besides its convolutions.

    .venv/bin/python benchmarks/ort_profile.py /work/runs/fullres/champion-export/model.int8.onnx
    .venv/bin/python benchmarks/ort_profile.py /work/runs/fullres/champion-export/model.onnx
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path

import common

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="an ONNX file written by unet/export.py (model.onnx or model.int8.onnx)")
    p.add_argument("--size", type=int, default=512, help="the square frame's side in pixels")
    p.add_argument("--repeats", type=int, default=5, help="timed passes")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: one per core)")
    args = p.parse_args()

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory() as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "ort")
        session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).random((1, 1, args.size, args.size), dtype=np.float32)
        for _ in range(2):
            session.run(["prob"], {"x": x})
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            session.run(["prob"], {"x": x})
        seconds = (time.perf_counter() - t0) / args.repeats
        events = json.loads(Path(session.end_profiling()).read_text())
    passes = args.repeats + 2
    by_op, count = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
            count[event["args"]["op_name"]] += 1
    total = sum(by_op.values())
    print(f"{args.model}: {seconds:.3f} s per {args.size}x{args.size} pass (wall, mean of "
          f"{args.repeats}); by operator (kernel time, all {passes} passes):")
    print("| operator | nodes | share | ms per pass |")
    print("|---|---|---|---|")
    for op, us in by_op.most_common():
        if us / total >= 0.005:
            print(f"| {op} | {count[op] // passes} | {100 * us / total:.1f} % | {us / passes / 1000:.1f} |")
    common.emit({"benchmark": "ort_profile", "model": args.model, "seconds_per_pass": round(seconds, 4),
                 "share": {op: round(us / total, 4) for op, us in by_op.most_common()},
                 "machine": common.machine()})


if __name__ == "__main__":
    main()
