"""The alignment search (``unet.align.estimate_shift``) against the search it replaced, on real
predictions: the val probability maps of a work directory's evaluations, each moved by every shift
of a grid, then searched by both. Prints how often the two agree (shift and error to the last
digit) and the seconds of each.

    .venv/bin/python benchmarks/align_search.py --work-dir /work/runs/fullres --work-dir /work/runs/smoke

The replaced search scored a 0.5 px grid of the whole window (49 shifts for +-1.5 px) and then the
eight 0.25 px neighbours of the best; the current one scores a 1 px grid (9), then the neighbours
of the best 0.5 px away, then 0.25 px away (20-25 in all). Without ``--work-dir``: the ISBI training
images read as probabilities (what ``unet.data.label_offset`` searches) against their labels.
"""
from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile

import common
from unet.align import Alignment, _shifted_mse, estimate_shift, image_as_probability, shift


def previous_search(prob: np.ndarray, target: np.ndarray, max_shift: float = 1.5, step: float = 0.25) -> Alignment:
    """``estimate_shift`` as it was until 2026-12-03: every second step of the window, then the one-step
    neighbours of the best."""
    prob, target = np.asarray(prob, np.float32), np.asarray(target).astype(np.float32)
    margin = int(np.ceil(max_shift)) + 1
    limit = int(round(max_shift / step))
    scores: dict[tuple[int, int], float] = {}

    def best_of(candidates) -> tuple[int, int]:
        new = [c for c in dict.fromkeys(candidates) if c not in scores and max(abs(c[0]), abs(c[1])) <= limit]
        with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
            scores.update(zip(new, pool.map(lambda c: _shifted_mse(prob, target, c[0] * step, c[1] * step, margin),
                                            new)))
        best = min(scores.values())
        ties = [c for c in scores if scores[c] <= best * (1 + 1e-6)]
        return min(ties, key=lambda c: (abs(c[0]) + abs(c[1]), c))

    coarse = range(-limit, limit + 1, 2) if limit % 2 == 0 else range(-limit + 1, limit, 2)
    y, x = best_of([(0, 0)] + [(dy, dx) for dy in coarse for dx in coarse])
    y, x = best_of([(y + a, x + b) for a in (-1, 0, 1) for b in (-1, 0, 1)])
    return Alignment(dy=y * step, dx=x * step, mse_before=scores[(0, 0)], mse_after=scores[(y, x)])


def cases(args) -> list[tuple[str, np.ndarray, np.ndarray]]:
    labels = tifffile.imread(Path(args.data_dir) / "train-labels.tif")
    if not args.work_dir:
        images = tifffile.imread(Path(args.data_dir) / "train-volume.tif")[:args.frames]
        return [("ISBI train images", image_as_probability(images), (labels[:args.frames] > 127).astype(np.uint8))]
    found = []
    val = (labels[2::3] > 127).astype(np.uint8)[:args.frames]  # the every_third split's val frames
    for work in args.work_dir:
        runs = sorted(Path(work).glob("evaluate/*/val/probabilities.tif"), key=os.path.getmtime)
        if not runs:
            raise SystemExit(f"{work}: no evaluate/*/val/probabilities.tif")
        prob = tifffile.imread(runs[-1]).astype(np.float32)
        prob = prob / 255 if prob.max() > 1.5 else prob
        found.append((str(runs[-1]), prob[:args.frames], val[:len(prob[:args.frames])]))
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", action="append", help="a work directory with evaluations (repeatable)")
    p.add_argument("--data-dir", default=str(common.REPO.parent / "shared" / "data" / "isbi2012"))
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--spacing", type=float, default=0.25, help="the moves tried: every SPACING px within +-1.5")
    args = p.parse_args()
    moves = np.arange(-1.5, 1.5 + 1e-9, args.spacing)
    records = []
    for name, prob, target in cases(args):
        agree, seconds = 0, {"previous": 0.0, "current": 0.0}
        for dy in moves:
            for dx in moves:
                moved = shift(prob, float(dy), float(dx))
                t0 = time.perf_counter()
                old = previous_search(moved, target)
                t1 = time.perf_counter()
                new = estimate_shift(moved, target)
                seconds["previous"] += t1 - t0
                seconds["current"] += time.perf_counter() - t1
                if new == old:
                    agree += 1
                else:
                    print(f"  differ at move ({dy:+.2f}, {dx:+.2f}): previous {old}, current {new}")
        n = len(moves) ** 2
        print(f"{name}: {len(prob)} frames {prob.shape[1]}x{prob.shape[2]}, {n} moves: same shift and error "
              f"in {agree} of {n}; seconds per search previous {seconds['previous'] / n:.3f}, "
              f"current {seconds['current'] / n:.3f}")
        records.append({"case": name, "moves": n, "agree": agree,
                        "previous_s": round(seconds["previous"] / n, 4), "current_s": round(seconds["current"] / n, 4)})
    common.emit({"benchmark": "align_search", "cases": records})


if __name__ == "__main__":
    main()
