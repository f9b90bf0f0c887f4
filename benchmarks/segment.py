"""Segmenting volumes: sections/s and peak memory of ``python flows/segment.py``, each case run as
a fresh process.

    .venv/bin/python benchmarks/segment.py --work-dir /work/runs/smoke --cases 30 300
    .venv/bin/python benchmarks/segment.py --model /work/runs/cropmodel/train/abc123 [--backend mindspore]
    .venv/bin/python benchmarks/segment.py --work-dir /work/runs/smoke --frame-model /work/runs/cropmodel/train/abc123

Cases: ``30``, the ISBI test volume (30 sections of 512x512); ``300``, the same repeated 10 times
(a TIFF stack written section by section); ``8192``, one 8192x8192 frame tiled from its sections
(16x16 tiles of 512x512, the 30 frames in order, each pass through them in another flip/rotation;
a tiled TIFF, so that blocks read only their tiles). The inputs are written into ``--tmp``.

Measured per case: the flow's own time (``seconds`` of ``OUT/.segment/complete.json``: predicting
the blocks and labelling the sections, without start-up, planning and the preview) and the
command's wall time (Python, MindSpore and Prefect imports and the temporary Prefect server
included), sections/s of each and the flow's Mpixel/s; peak RSS of the largest process (the
kernel's ``ru_maxrss`` of the command and of the processes it waited for, from ``os.wait4``) and of
the process tree (the RSS of the command and all its descendants summed: the flow, the temporary
server, Dask workers; sampled every 0.1 s). The issue's goal: 300 sections within 1.25x the peak
RSS of 30. A resize model (smoke, seed) predicts a frame resized to its training size, so give the
8192 case a native-resolution ("crop") model with ``--frame-model``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

import numpy as np
import psutil
import tifffile

ISBI = str(common.REPO.parent / "shared" / "data" / "isbi2012" / "test-volume.tif")
FLOW = str(common.REPO / "flows" / "segment.py")
CASES = ("30", "300", "8192")
GOAL = 1.25


def isbi_frames(path: str) -> list[np.ndarray]:
    """The 30 sections of the ISBI test volume (7.5 MB)."""
    with tifffile.TiffFile(path) as tif:
        return [page.asarray() for page in tif.pages]


def write_repeated(frames: list[np.ndarray], path: Path, times: int) -> None:
    """The frames repeated ``times`` times as one TIFF stack, streamed section by section."""
    tifffile.imwrite(path, data=(f for _ in range(times) for f in frames), shape=(times * len(frames),
                     *frames[0].shape), dtype=np.uint8, photometric="minisblack")


def write_mosaic(frames: list[np.ndarray], path: Path, side: int = 16) -> None:
    """One frame of ``side`` x ``side`` tiles (the frames in order; the k-th pass through them turned
    by the k-th flip/rotation), written as a tiled TIFF one tile at a time."""
    def tiles():
        for i in range(side * side):
            frame, k = frames[i % len(frames)], i // len(frames)
            yield np.ascontiguousarray(np.rot90(frame if k % 8 < 4 else frame.T, k % 4))

    h, w = frames[0].shape
    tifffile.imwrite(path, data=tiles(), shape=(side * h, side * w), dtype=np.uint8, tile=(h, w),
                     photometric="minisblack")


def make_input(case: str, tmp: Path, source: str) -> Path:
    """The input of ``case``: the ISBI volume itself (30), or a TIFF written into ``tmp`` once."""
    path = Path(source) if case == "30" else tmp / f"input-{case}.tif"
    if not path.exists():
        frames = isbi_frames(source)
        if case == "300":
            write_repeated(frames, path, 10)
        else:
            write_mosaic(frames, path)
    return path


def tree_rss(pid: int) -> int:
    """Bytes resident in ``pid`` and all its descendants now."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return total


def run(cmd: list[str], env: dict, log: Path) -> dict:
    """Run ``cmd`` (output into ``log``): wall seconds, exit code, peak RSS (MiB) of its largest process
    and of its process tree."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    tree = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        tree = max(tree, tree_rss(proc.pid))
        time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": time.perf_counter() - t0, "code": proc.returncode,
            "rss_max_mb": usage.ru_maxrss / 1024, "rss_tree_mb": tree / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="artifacts", help="the pipeline's work directory (where the champion is)")
    p.add_argument("--model", default="champion", help="'champion' or a train stage folder (flows/segment.py --model)")
    p.add_argument("--frame-model", help="the model of the 8192 case (default: --model); a crop recipe's")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--input", default=ISBI, help="the ISBI test volume")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--backend", help="flows/segment.py --backend (default: the flow's)")
    p.add_argument("--block", type=int, help="flows/segment.py --block (default: the flow's)")
    p.add_argument("--tta", help="flows/segment.py --tta (default: the model's recipe)")
    p.add_argument("--keep", action="store_true", help="keep the outputs (and the scratch folder)")
    p.add_argument("--tmp", help="scratch folder for inputs and outputs (default: a new one under /tmp, removed "
                                 "at the end; a given one is kept, and its inputs reused)")
    args = p.parse_args()

    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="segment-bench-", dir="/tmp")).resolve()
    tmp.mkdir(parents=True, exist_ok=True)
    # a Prefect home of its own (no other run's database), migrated before anything is timed
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    subprocess.run([str(Path(sys.executable).parent / "prefect"), "--no-prompt", "server", "database", "upgrade",
                    "-y"], env=env, check=True, capture_output=True)
    code = subprocess.run(["git", "-C", str(common.REPO), "describe", "--always", "--dirty"], capture_output=True,
                          text=True).stdout.strip()
    print(f"code {code}; scratch {tmp}", flush=True)
    rows = {}
    try:
        for case in args.cases:
            source = make_input(case, tmp, args.input)
            out = tmp / f"out-{case}.ome.zarr"
            shutil.rmtree(out, ignore_errors=True)
            model = args.frame_model if case == "8192" and args.frame_model else args.model
            cmd = [sys.executable, FLOW, str(source), "--output", str(out), "--work-dir", args.work_dir,
                   "--model", model, "--workers", str(args.workers)]
            cmd += ["--backend", args.backend] if args.backend else []
            cmd += ["--block", str(args.block)] if args.block else []
            cmd += ["--tta", args.tta] if args.tta else []
            print(f"[{case}] {' '.join(cmd)}", flush=True)
            result = run(cmd, env, tmp / f"log-{case}.txt")
            if result["code"]:
                print((tmp / f"log-{case}.txt").read_text()[-3000:], file=sys.stderr)
                raise SystemExit(f"case {case}: exit code {result['code']} (the end of its output above)")
            summary = json.loads((out / ".segment" / "complete.json").read_text())
            rows[case] = {**result, **summary}
            s = summary["settings"]
            print(f"[{case}] model {summary['model']} on {summary.get('backend', 'mindspore')}: recipe {s['recipe']}, "
                  f"block {s['block']}, halo {s['halo']}, TTA {s['tta']}; {summary['seconds']} s in the flow, "
                  f"{result['wall_s']:.1f} s wall", flush=True)
            if not args.keep:
                shutil.rmtree(out)
    finally:
        if args.keep or args.tmp:
            print(f"scratch folder kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print("\n| case | sections | frame | blocks | recipe, backend | flow s | sections/s | Mpixel/s | wall s "
          "| sections/s (wall) | peak RSS MiB, largest process | peak RSS MiB, process tree |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case, r in rows.items():
        z, h, w = r["shape"]
        print(f"| {case} | {z} | {h}x{w} | {r['blocks']} | {r['settings']['recipe']}, "
              f"{r.get('backend', 'mindspore')} | {r['seconds']:.1f} "
              f"| {z / r['seconds']:.3g} | {z * h * w / 1e6 / r['seconds']:.2f} | {r['wall_s']:.1f} "
              f"| {z / r['wall_s']:.3g} | {r['rss_max_mb']:.0f} | {r['rss_tree_mb']:.0f} |")
    if "30" in rows and "300" in rows:
        ratios = [rows["300"][k] / rows["30"][k] for k in ("rss_max_mb", "rss_tree_mb")]
        print(f"\npeak RSS 300 / 30 sections: {ratios[0]:.2f}x largest process, {ratios[1]:.2f}x process tree "
              f"(goal: at most {GOAL}x)")


if __name__ == "__main__":
    main()
