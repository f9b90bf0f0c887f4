"""Where the evaluate stage's seconds go: a copy of a smoke work directory without its evaluate and
predict folders is run again by the pipeline's command line (MindSpore imported first, as after
training), with the evaluate stage's steps timed from its start: loading the
predictor, the case's metrics, the native predictions, the alignment search, the native scores
(train, then val), and the two figures drawn in their thread.

    .venv/bin/python benchmarks/evaluate_timeline.py --work-dir /work/runs/smoke

The work directory itself is not touched (the copy lives in a temporary folder).
"""
from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import common

STEPS = {"unet.backends": ["load_predictor"], "unet.evaluate": ["case_metrics", "native_scores"],
         "unet.align": ["estimate_shift"], "unet.infer": ["predict_frame", "predict_files"],
         "unet.viz": ["plot_history", "plot_examples"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", required=True, help="a computed smoke work directory")
    p.add_argument("--data-dir", default=str(common.REPO.parent / "shared" / "data" / "isbi2012"))
    args = p.parse_args()

    import importlib

    import mindspore  # noqa: F401  (a fresh run's training imported it before evaluate)

    log: list[tuple[str, str, float, float]] = []
    for module, names in STEPS.items():
        mod = importlib.import_module(module)
        for name in names:
            real = getattr(mod, name)

            def timed(*a, _real=real, _name=name, **k):
                t0 = time.perf_counter()
                try:
                    return _real(*a, **k)
                finally:
                    log.append((_name, threading.current_thread().name, t0, time.perf_counter()))
            setattr(mod, name, functools.wraps(real)(timed))
    import tasks.evaluate

    window: list[float] = []  # the evaluate stage's starts and ends
    run_stage = tasks.evaluate.run_stage

    def timed_stage(*a, **k):
        window.append(time.perf_counter())
        try:
            return run_stage(*a, **k)
        finally:
            window.append(time.perf_counter())
    tasks.evaluate.run_stage = timed_stage

    from flows.cli import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "work"
        shutil.copytree(args.work_dir, work, symlinks=True)
        for stage in ("evaluate", "predict"):
            shutil.rmtree(work / stage, ignore_errors=True)
        t0 = time.perf_counter()
        code = cli(["--data-dir", args.data_dir, "--work-dir", str(work), "--preset", "smoke"])
        if code != 0:
            raise SystemExit(f"the pipeline failed with exit code {code}")
        wall = time.perf_counter() - t0
    if not window:
        raise SystemExit("the evaluate stage did not run")
    # the stage's longest call: the pipeline also calls it for a cached result (the champion's)
    start, end = max(zip(window[::2], window[1::2]), key=lambda pair: pair[1] - pair[0])
    steps = sorted((name, thread, a - start, b - start) for name, thread, a, b in log if start <= a <= end)
    steps.sort(key=lambda step: step[2])
    print(f"evaluate: {end - start:.2f} s; its steps, seconds from its start (pipeline run {wall:.1f} s):")
    frames = [s for s in steps if s[0] == "predict_frame"]
    for name, thread, start, end in steps:
        if name != "predict_frame":
            print(f"  {name:16s} {thread[:12]:12s} {start:6.2f} -> {end:6.2f}  ({end - start:.2f})")
    if frames:
        print(f"  predict_frame x{len(frames)} {frames[0][2]:6.2f} -> {frames[-1][3]:6.2f}")
    common.emit({"benchmark": "evaluate_timeline", "pipeline_wall_s": round(wall, 2), "evaluate_s": round(end - start, 2),
                 "steps": [{"step": n, "thread": t, "start": round(a, 3), "end": round(b, 3)}
                           for n, t, a, b in steps if n != "predict_frame"]})


if __name__ == "__main__":
    main()
