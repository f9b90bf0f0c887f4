"""Epoch time of data-parallel training with 1 and N msrun ranks on this machine (real frames).

    .venv/bin/python benchmarks/distributed.py --preset smoke --epochs 3 --workers 1 2
    .venv/bin/python benchmarks/distributed.py --preset seed --epochs 1 --workers 1 2

Per worker count: ``wall_s`` is the whole call (msrun start, cluster set-up, graph compile,
training, evaluation, checkpoints), ``epoch_s`` / ``train_s`` / ``eval_s`` the last epoch's
``seconds`` / ``train_seconds`` / ``eval_seconds`` of history.csv (with more than one epoch the
last one is free of the compile). ``workers: 1`` is the plain single-process ``train``. Each
configuration runs in a child process of its own, one after the other, so that no memory is
held across them (a seed-preset rank needs about 5 GB); ``peak_rss_mib`` is the largest rank's
(or the single process's) peak. The load average before and after is printed too: other jobs on
the machine share its cores.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

import cv2
import pandas as pd
import tifffile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smoke")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--data-dir", default=str(common.REPO.parent / "shared" / "data" / "isbi2012"))
    p.add_argument("--one", nargs=2, metavar=("WORKERS", "DIR"), help=argparse.SUPPRESS)  # a child run
    args = p.parse_args()

    from unet.recipes import get_preset

    recipe = get_preset(args.preset).replace(epochs=args.epochs)
    if args.one:
        return run_one(recipe, int(args.one[0]), Path(args.one[1]))
    vol = tifffile.imread(Path(args.data_dir) / "train-volume.tif")
    lab = tifffile.imread(Path(args.data_dir) / "train-labels.tif")
    load_before = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(len(vol)):
            cv2.imwrite(str(Path(tmp) / f"{i:05d}.png"), vol[i])
            cv2.imwrite(str(Path(tmp) / f"{i:05d}_m.png"), lab[i])
        for n in args.workers:
            child = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--epochs", str(args.epochs),
                                    "--one", str(n), tmp], check=True, capture_output=True, text=True)
            runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
    common.emit({"benchmark": "distributed", "preset": args.preset, "epochs": args.epochs,
                 "batch_size": recipe.batch_size, "runs": runs,
                 "load_avg_before": [round(x, 2) for x in load_before],
                 "load_avg_after": [round(x, 2) for x in os.getloadavg()]})


def run_one(recipe, workers: int, frames: Path) -> None:
    """Train on the frames in ``frames`` with ``workers`` ranks; print the run's JSON line."""
    from unet.distributed import Cluster, launch
    from unet.train import train

    pairs = [(frames / f"{i:05d}.png", frames / f"{i:05d}_m.png") for i in range(len(list(frames.glob("*_m.png"))))]
    train_pairs, val_pairs = [q for i, q in enumerate(pairs) if i % 3], pairs[::3]  # the case's split
    out = frames / f"run-{workers}"
    t0 = time.perf_counter()
    if workers == 1:
        train(recipe, train_pairs, val_pairs, out, resume=False)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    else:
        launch(recipe, train_pairs, val_pairs, out, Cluster(workers), resume=False)
        peak = max(json.loads((out / "logs" / f"rank_{r}.json").read_text())["peak_rss_mib"]
                   for r in range(workers))
    wall = time.perf_counter() - t0
    last = pd.read_csv(out / "history.csv").iloc[-1]
    print(json.dumps({"workers": workers, "wall_s": round(wall, 1), "epoch_s": round(float(last["seconds"]), 2),
                      "train_s": round(float(last["train_seconds"]), 2),
                      "eval_s": round(float(last["eval_seconds"]), 2), "final_loss": round(float(last["loss"]), 4),
                      "peak_rss_mib": round(peak)}))


if __name__ == "__main__":
    main()
