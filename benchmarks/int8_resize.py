"""Would the int8 model run faster with its upsampling in 8 bits? A negative result kept with its
command. In the QDQ graph of flows/export.py every bilinear ``Resize`` sits between a
``DequantizeLinear`` and a ``QuantizeLinear`` of one and the same scale and zero point, and ONNX
Runtime runs it in float (``benchmarks/ort_profile.py``: Resize and its Q/DQ are 14.7 % of an int8
pass). This script rewires a copy of an export's ``model.int8.onnx`` so that each such Resize reads
and writes the uint8 tensors directly (ONNX Runtime has a uint8 Resize kernel), then times both
graphs on real ISBI sections and compares their probabilities.

    .venv/bin/python benchmarks/int8_resize.py --export /work/runs/fullres/champion-export
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import tifffile
from onnx import numpy_helper

import common


def uint8_resizes(model: onnx.ModelProto) -> int:
    """Rewire, in place, every DequantizeLinear -> Resize -> QuantizeLinear chain whose two scales
    and zero points are equal so that the Resize works on the quantized tensor; returns how many."""
    graph = model.graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    dropped = []
    for node in graph.node:
        if node.op_type != "Resize":
            continue
        dq, after = producer.get(node.input[0]), consumers.get(node.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or len(after) != 1 or after[0].op_type != "QuantizeLinear":
            continue
        q = after[0]
        if not all(np.array_equal(constants[a], constants[b]) for a, b in zip(dq.input[1:], q.input[1:])):
            continue
        node.input[0], node.output[0] = dq.input[0], q.output[0]
        dropped += [q] + ([dq] if len(consumers[dq.output[0]]) == 1 else [])
    kept = [n for n in graph.node if all(n is not d for d in dropped)]
    del graph.node[:]
    graph.node.extend(kept)
    return sum(1 for d in dropped if d.op_type == "QuantizeLinear")


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, help="an export folder of flows/export.py (with model.int8.onnx)")
    p.add_argument("--data-dir", default=str(common.REPO.parent / "shared" / "data" / "isbi2012"))
    p.add_argument("--sections", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    original = Path(args.export) / "model.int8.onnx"
    model = onnx.load(original)
    rewired = uint8_resizes(model)
    x = tifffile.imread(Path(args.data_dir) / "test-volume.tif")[:args.sections, None].astype(np.float32) / 255
    with tempfile.TemporaryDirectory() as tmp:
        changed = Path(tmp) / "model.int8.uint8-resize.onnx"
        onnx.save(model, changed)
        sessions = {"as exported": session(original, args.threads), "uint8 Resize": session(changed, args.threads)}
        name = sessions["as exported"].get_inputs()[0].name
        out = {k: s.run(None, {name: x})[0] for k, s in sessions.items()}  # also the warm-up
        seconds = {k: [] for k in sessions}
        for _ in range(args.repeats):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, {name: x})
                seconds[k].append((time.perf_counter() - t0) / len(x))
    diff = np.abs(out["as exported"] - out["uint8 Resize"])
    flips = float(((out["as exported"] >= 0.5) != (out["uint8 Resize"] >= 0.5)).mean())
    median = {k: float(np.median(v)) for k, v in seconds.items()}
    print(f"{rewired} Resize nodes rewired; {len(x)} ISBI test sections, {args.threads} threads, median of "
          f"{args.repeats}: as exported {median['as exported']:.3f} s per section, uint8 Resize "
          f"{median['uint8 Resize']:.3f} s; probabilities max |diff| {diff.max():.4f}, mean {diff.mean():.5f}, "
          f"mask pixels flipped {100 * flips:.3f} %")
    common.emit({"benchmark": "int8_resize", "rewired": rewired, "seconds_per_section": median,
                 "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "flipped": flips})


if __name__ == "__main__":
    main()
