"""The kill matrix (issue 20): a run of ``python flows/full_pipeline.py`` is paused at a point
(run_with_fault.py ``FAULT=pause-at``), sent a signal, then run again with the same arguments.
One cell is (point, signal, target); :func:`run_cell` measures it:

- the exit code (130 after SIGINT, 143 after SIGTERM, -9 after SIGKILL);
- one clear line: exactly one ``error:`` line, the expected one, and no traceback (not for SIGKILL);
- survivors: processes the run started (every process with the run's ``PREFECT_HOME``: the
  temporary Prefect server, msrun and its ranks, Dask workers, the watchdog) still alive 60 s after;
- the rerun: exit 0 and outputs identical to an uninterrupted run's (:func:`output_hashes`).

``target`` is ``group`` (``os.killpg``: the run leads its own process group, as a terminal's Ctrl-C
or a supervisor's stop reaches a job) or ``main`` (``kill PID``: the run's process alone).
Used by test_kill_matrix.py and benchmarks/kill_matrix.py."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from robustness_support import SEGMENT, Pipeline, error_lines, new_home, summary_of, wait_gone

HERE = Path(__file__).resolve().parent
FAULT_RUNNER = HERE / "run_with_fault.py"
STAGE_ORDER = ["extract", "split", "datasets", "train", "evaluate", "predict"]
# before the flow (input checks done), the flow started, then in and after each stage
# python flows/segment.py on the test volume with the reference run's champion, paused mid-volume
SEGMENT_POINT = "mid:segment-volume"
POINTS = (["check", "before:extract"] + [f"{where}:{stage}" for stage in STAGE_ORDER for where in ("mid", "after")
                                         if (where, stage) != ("after", "predict")] + [SEGMENT_POINT])
SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL]
TARGETS = ["group", "main"]
# smoke recipe, 2 epochs (mid:train pauses in epoch 2), on small_data(frames=15, test=12, side=256)
ARGS = ["--preset", "smoke", "--epochs", "2"]
EXPECTED_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -signal.SIGKILL}
EXPECTED_LINE = {signal.SIGINT: "error: interrupted", signal.SIGTERM: "error: stopped by SIGTERM"}
# a loaded machine (2 cores, load 17) has taken over 120 s, the pipeline's default, to start the server
ENV = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "900"}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def output_hashes(work: Path) -> dict[str, str]:
    """sha256 of the final masks (each PNG), the probabilities TIFF and the summary's metrics
    (as sorted JSON) of the latest run in ``work``."""
    summary = summary_of(work)
    masks = Path(summary["outputs"]["test_masks"])
    hashes = {f"masks/{p.name}": _sha(p) for p in sorted(masks.glob("*.png"))}
    hashes["probabilities.tif"] = _sha(Path(summary["outputs"]["test_probabilities"]))
    hashes["metrics"] = hashlib.sha256(json.dumps(summary["metrics"], sort_keys=True).encode()).hexdigest()
    return hashes


@dataclass
class Cell:
    point: str
    signal: str
    target: str
    exit_code: int | None = None
    expected_exit: int | None = None
    one_line: bool | None = None  # None for SIGKILL: nothing can be printed
    error_line: str = ""
    survivors: dict[int, str] = field(default_factory=dict)
    rerun_exit: int | None = None
    identical: bool | None = None
    seconds: float = 0.0
    note: str = ""

    @property
    def passed(self) -> bool:
        return (self.exit_code == self.expected_exit and self.one_line is not False and not self.survivors
                and self.rerun_exit == 0 and bool(self.identical))

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def reference_run(pipe: Pipeline, data: Path, work: Path) -> dict[str, str]:
    """An uninterrupted run's output hashes."""
    done = pipe.run(["--data-dir", str(data), "--work-dir", str(work), *ARGS], timeout=1800, env=ENV)
    if done.returncode != 0:
        raise RuntimeError(f"the reference run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return output_hashes(work)


def segmentation_args(data: Path, reference_work: Path, out: Path) -> list[str]:
    """``python flows/segment.py``'s arguments of the segment-volume cells: the small test volume
    with the reference run's champion, one block per Prefect task, TIFF outputs in ``out``."""
    return [str(data / "test-volume.tif"), "--work-dir", str(reference_work), "--output", str(out),
            "--format", "tiff", "--blocks-per-task", "1"]


def segmentation_hashes(out: Path) -> dict[str, str]:
    """sha256 of the pixels of the three output stacks (not of the files: their metadata may differ)."""
    import tifffile

    return {name: hashlib.sha256(tifffile.imread(out / name).tobytes()).hexdigest()
            for name in ("probabilities.tif", "masks.tif", "cells.tif")}


def reference_segmentation(pipe: Pipeline, data: Path, reference_work: Path, out: Path) -> dict:
    """An uninterrupted segmentation (``pipe`` runs flows/segment.py) as :func:`run_cell` takes it:
    ``{"work": reference_work, "hashes": its output hashes}``."""
    done = pipe.run(segmentation_args(data, reference_work, out), timeout=1800, env=ENV)
    if done.returncode != 0:
        raise RuntimeError(f"the reference segmentation failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {"work": str(reference_work), "hashes": segmentation_hashes(out)}


def run_cell(root: Path, migrated_db: Path | None, data: Path, reference: dict[str, str], point: str,
             signum: int, target: str, timeout: float = 1200, segmentation: dict | None = None) -> Cell:
    """One cell in ``root`` (a fresh folder: its own Prefect home and work directory). The
    segment-volume point needs ``segmentation`` (:func:`reference_segmentation`); its rerun is
    compared with that segmentation's hashes."""
    t0 = time.monotonic()
    cell = Cell(point, signal.Signals(signum).name, target, expected_exit=EXPECTED_EXIT[signum])
    segmenting = point == SEGMENT_POINT
    pipe = Pipeline(new_home(root / "prefect-home", migrated_db), root / "logs",
                    **({"script": SEGMENT} if segmenting else {}))
    work, marker = root / "work", root / "paused"
    if segmenting:
        args = segmentation_args(data, Path(segmentation["work"]), root / "segmentation")
    else:
        args = ["--data-dir", str(data), "--work-dir", str(work), *ARGS]
    proc = pipe.start(args, "interrupted", wrapper=[str(FAULT_RUNNER)], new_session=True,
                      env={**ENV, "FAULT": "pause-at", "PAUSE_POINT": point, "PAUSE_MARKER": str(marker)})
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            if proc.poll() is not None:
                cell.note = f"exited ({proc.returncode}) before reaching {point}: {pipe.output(proc)[1][-300:]}"
                return cell
            if time.monotonic() > deadline:
                cell.note = f"did not reach {point} in {timeout} s"
                return cell
            time.sleep(0.05)
        if target == "group":
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        try:
            cell.exit_code = proc.wait(180)
        except Exception:
            cell.note = "did not exit within 180 s of the signal"
            proc.kill()
            proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = pipe.output(proc)[1]
    if signum != signal.SIGKILL:
        lines = error_lines(err)
        cell.error_line = lines[0] if lines else ""
        cell.one_line = (len(lines) == 1 and lines[0].startswith(EXPECTED_LINE[signum])
                         and "Traceback" not in err)
    cell.survivors = wait_gone(pipe.home, 60)
    if cell.survivors:
        from robustness_support import stop_leftovers

        stop_leftovers(pipe.home)  # measured; now they must not disturb the rerun or later cells
    rerun = pipe.run(args, timeout=timeout, env=ENV)
    cell.rerun_exit = rerun.returncode
    if rerun.returncode == 0:
        cell.identical = (segmentation_hashes(root / "segmentation") == segmentation["hashes"] if segmenting
                          else output_hashes(work) == reference)
    else:
        cell.note = (cell.note + " rerun: " + rerun.stderr[-300:]).strip()
    left = wait_gone(pipe.home, 30)
    if left:
        cell.note = (cell.note + f" left after the rerun: {left}").strip()
        cell.survivors = {**cell.survivors, **left}
    cell.seconds = round(time.monotonic() - t0, 1)
    return cell


def table(cells: list[Cell]) -> str:
    """The matrix as a markdown table, one row per cell."""
    rows = ["| point | signal | target | exit | one clear line | survivors | rerun identical | s |",
            "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        exit_text = f"{c.exit_code}" + ("" if c.exit_code == c.expected_exit else f" (expected {c.expected_exit})")
        line = "n/a" if c.one_line is None else ("yes" if c.one_line else f"no: {c.error_line[:60]!r}")
        survivors = "none" if not c.survivors else "; ".join(v[:60] for v in c.survivors.values())
        rerun = ("yes" if c.identical else "no") if c.rerun_exit == 0 else f"rerun exit {c.rerun_exit}"
        rows.append(f"| {c.point} | {c.signal} | {c.target} | {exit_text} | {line} | {survivors} | {rerun} "
                    f"| {c.seconds:.0f} |" + (f" {c.note}" if c.note else ""))
    return "\n".join(rows)
