"""The kill matrix (issue 20, docs/robustness.md "Kill matrix"): every point x signal x target of
tests/robustness/kill_matrix_support.py, each cell a paused run, a signal, a rerun, compared with
one uninterrupted run. Prints a markdown table; each cell is also appended to ``--out``/cells.jsonl
as it finishes (a long matrix can be read, or continued with ``--skip-done``, while it runs).

    nice -n 5 .venv/bin/python benchmarks/kill_matrix.py --data-dir ../shared/data/isbi2012
    .venv/bin/python benchmarks/kill_matrix.py --points mid:train after:train --signals SIGKILL --targets main

Each cell takes one run up to its point and one rerun (smoke recipe, 2 epochs, 15 labelled and 12
test frames of 256x256 cut from the real stacks).
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tifffile

import common

sys.path.insert(0, str(common.REPO / "tests" / "robustness"))
from kill_matrix_support import (POINTS, SEGMENT_POINT, SIGNALS, TARGETS, Cell, reference_run,  # noqa: E402
                                 reference_segmentation, run_cell, table)
from robustness_support import SEGMENT, VOLUMES, Pipeline, cli_env, new_home, small_data  # noqa: E402


def migrated_db(folder: Path) -> Path:
    """A migrated, empty Prefect database to copy into each cell's home (saves ~10 s a run)."""
    folder.mkdir(parents=True, exist_ok=True)
    prefect = Path(sys.executable).with_name("prefect")
    subprocess.run([str(prefect), "server", "database", "upgrade", "-y"], env=cli_env(folder), check=True,
                   capture_output=True, timeout=600)
    return folder / "prefect.db"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(common.REPO.parent / "shared" / "data" / "isbi2012"))
    p.add_argument("--out", default=None, help="folder for the cells' runs and cells.jsonl (default: a temporary one)")
    p.add_argument("--points", nargs="+", default=POINTS, choices=POINTS)
    p.add_argument("--signals", nargs="+", default=[s.name for s in SIGNALS], choices=[s.name for s in SIGNALS])
    p.add_argument("--targets", nargs="+", default=TARGETS, choices=TARGETS)
    p.add_argument("--skip-done", action="store_true", help="skip cells already in --out/cells.jsonl")
    p.add_argument("--keep", action="store_true", help="keep each cell's work directory")
    args = p.parse_args()
    # stopped: raise, so that run_cell kills the cell's run (its watchdog then stops the rest)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))

    out = Path(args.out or tempfile.mkdtemp(prefix="kill-matrix-"))
    out.mkdir(parents=True, exist_ok=True)
    results = out / "cells.jsonl"
    done = {}
    if args.skip_done and results.exists():
        for line in results.read_text().splitlines():
            row = json.loads(line)
            done[(row["point"], row["signal"], row["target"])] = row
    data = out / "data"
    if not data.exists():
        isbi = Path(args.data_dir)
        stacks = {k: tifffile.imread(isbi / name) for k, name in zip(("volume", "labels", "test"), VOLUMES)}
        small_data(data, stacks, frames=15, test=12, side=256)
    db = migrated_db(out / "prefect-template")
    reference_file = out / "reference.json"
    if reference_file.exists():
        reference = json.loads(reference_file.read_text())
    else:
        t0 = time.monotonic()
        pipe = Pipeline(new_home(out / "reference" / "prefect-home", db), out / "reference" / "logs")
        reference = reference_run(pipe, data, out / "reference" / "work")
        reference_file.write_text(json.dumps(reference, indent=1))
        print(f"reference run: {time.monotonic() - t0:.0f} s", flush=True)
    segmentation = None
    if SEGMENT_POINT in args.points:  # an uninterrupted segmentation with the reference run's champion
        segmentation_file = out / "reference-segmentation.json"
        if not segmentation_file.exists():
            t0 = time.monotonic()
            pipe = Pipeline(new_home(out / "reference" / "prefect-home-segment", db), out / "reference" / "logs",
                            script=SEGMENT)
            reference_seg = reference_segmentation(pipe, data, out / "reference" / "work",
                                                   out / "reference" / "segmentation")
            segmentation_file.write_text(json.dumps(reference_seg, indent=1))
            print(f"reference segmentation: {time.monotonic() - t0:.0f} s", flush=True)
        segmentation = json.loads(segmentation_file.read_text())

    cells = []
    for point in args.points:
        for name in args.signals:
            for target in args.targets:
                if (point, name, target) in done:
                    row = {k: v for k, v in done[(point, name, target)].items() if k != "passed"}
                    row["survivors"] = {int(k): v for k, v in row["survivors"].items()}
                    cells.append(Cell(**row))
                    continue
                root = out / "cells" / f"{point.replace(':', '-')}-{name}-{target}"
                shutil.rmtree(root, ignore_errors=True)
                cell = run_cell(root, db, data, reference, point, getattr(signal, name), target,
                                segmentation=segmentation)
                cells.append(cell)
                with results.open("a") as f:
                    f.write(json.dumps(cell.to_dict()) + "\n")
                print(f"{point:<15} {name:<7} {target:<5} exit {cell.exit_code} line {cell.one_line} "
                      f"survivors {len(cell.survivors)} rerun {cell.rerun_exit} identical {cell.identical} "
                      f"{cell.seconds:.0f} s {'PASS' if cell.passed else 'FAIL'} {cell.note}", flush=True)
                if not args.keep:
                    shutil.rmtree(root / "work", ignore_errors=True)
    print()
    print(table(cells))
    failed = [c for c in cells if not c.passed]
    print(f"\n{len(cells) - len(failed)} of {len(cells)} cells pass (machine: {common.machine()['cpu']}, "
          f"{common.machine()['cores']} cores)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
