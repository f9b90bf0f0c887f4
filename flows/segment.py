"""Segment a new volume with a trained model: ``python flows/segment.py INPUT [--output OUT] ...``

    plan_segmentation -> predict_blocks (x batches) -> label_sections (x sections) -> finish_segmentation

Blocks and sections run on the flow's task runner: one thread (default), a local Dask cluster of
``workers`` single-threaded processes, or an existing cluster at ``dask_address``. Every block and
section is marked done in the output once written, so a rerun continues where a killed run
stopped, and a rerun of a finished segmentation only checks it. ``python flows/segment.py --help``
lists the options; the command line is :mod:`flows.segment_cli`, this module only the flow.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # before any thread starts: a Ctrl-C stays SIGINT under MindSpore (flows/sigint.py)
    from flows.sigint import forward_sigint

    forward_sigint()

from flows.command import prefect_defaults  # noqa: E402

prefect_defaults()
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # Dask workers: no start/stop chatter

from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact  # noqa: E402
from prefect.futures import as_completed  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from tasks.segment import (blocks_to_do, completed_summary, finish_segmentation, label_sections,  # noqa: E402
                           plan_segmentation, predict_blocks, resolve_model, sections_to_do, summary_markdown)
from unet.backends import check_precision  # noqa: E402
from unet.blocks import DEFAULT_BLOCK  # noqa: E402
from unet.tta import default_level  # noqa: E402

FORMATS = ("zarr", "tiff")
TASKS_PER_WORKER = 4   # enough batches for an even spread and a progress bar that moves
MAX_BLOCKS_PER_TASK = 16


def default_output(input: str, work_dir: str, format: str) -> str:
    """``<work_dir>/segmentations/<input name>.ome.zarr`` (zarr) or ``.../<input name>/`` (tiff)."""
    name = Path(input.rstrip("/")).name
    for suffix in (".ome.zarr", ".zarr", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return str(Path(work_dir) / "segmentations" / (f"{name}.ome.zarr" if format == "zarr" else name))


def task_runner(workers: int = 1, dask_address: str | None = None):
    """One thread, a local Dask cluster of ``workers`` single-threaded processes, or the cluster at
    ``dask_address``."""
    if dask_address or workers > 1:
        from prefect_dask import DaskTaskRunner

        logging.getLogger("distributed").setLevel(logging.WARNING)  # the cluster's start/stop chatter

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None, "silence_logs": logging.WARNING})
    return ThreadPoolTaskRunner(max_workers=1)


def _cluster_workers(address: str) -> int:
    """How many workers the Dask cluster at ``address`` has now (for batching the blocks)."""
    from distributed import Client

    with Client(address, timeout=30) as client:
        return max(1, len(client.scheduler_info()["workers"]))


def batches(items: list[int], workers: int, limit: int | None) -> list[list[int]]:
    """``items`` cut into consecutive batches: ``limit`` each, else about TASKS_PER_WORKER batches
    per worker of at most MAX_BLOCKS_PER_TASK."""
    size = limit or max(1, min(MAX_BLOCKS_PER_TASK, -(-len(items) // (TASKS_PER_WORKER * workers))))
    return [items[i:i + size] for i in range(0, len(items), size)]


def _run_all(runner, task, argument: str, plan: dict, groups: list[list[int]], what: str,
             per_section: int) -> None:
    """Submit ``task(plan=plan, <argument>=group)`` for every group and log progress as they finish."""
    logger = get_run_logger()
    total = sum(len(g) for g in groups)
    if not total:
        return
    progress = create_progress_artifact(0.0, description=f"segment-volume: {what}")
    t0, done = time.perf_counter(), 0
    futures = {runner.submit(task, {"plan": plan, argument: g}): len(g) for g in groups}
    for future in as_completed(list(futures)):
        future.result()  # raises the task's error
        done += futures[future]
        elapsed = time.perf_counter() - t0
        rate = done / elapsed
        logger.info("%s: %d/%d done, %.2f sections/s, %.0f s to go", what, done, total, rate / per_section,
                    (total - done) / rate)
        update_progress_artifact(progress, 100.0 * done / total)


@flow(name="segment-volume")
def segment_volume(input: str, output: str | None = None, format: str = "zarr", work_dir: str = "artifacts",
                   model: str = "champion", backend: str = "onnxruntime", precision: str = "auto",
                   tta: str | None = None, tta_scales: list[float] | None = None,
                   block: int = DEFAULT_BLOCK, halo: int | None = None, workers: int = 1,
                   dask_address: str | None = None, blocks_per_task: int | None = None,
                   overwrite: bool = False) -> dict:
    """Cell probabilities, mask and cell instances of the volume ``input`` (TIFF stack, folder of
    frames, Zarr/OME-Zarr) with ``model`` (``champion`` of ``work_dir``, or a train stage folder /
    checkpoint), written block by block to ``output`` (default: ``default_output``). ``precision``:
    fp32, int8 (ONNX Runtime, the model's export calibrated on its training frames), or auto: int8
    where the export's check found it keeps the model's val scores, else fp32. ``tta_scales``
    defaults to the model's (its evaluation's scales), ``tta`` to its recipe's level
    (``unet.tta.default_level``: d4 at several scales runs as d4-flips); ``block``
    and ``halo``: unet.blocks.Settings. Returns the summary written to ``.segment/complete.json``."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    check_precision(precision, backend, auto=True)
    logger = get_run_logger()
    m = resolve_model(model, work_dir, precision, backend)
    if m.get("onnx") and backend != "onnxruntime":
        raise ValueError(f"{model}: an exported model runs on onnxruntime, not {backend}")
    scales = [float(s) for s in (tta_scales or m["tta_scales"])]
    tta = tta or default_level(m["recipe"]["tta"], scales)
    output = output or default_output(input, work_dir, format)
    # ONNX Runtime threads per process: every core for one process, a share of them per local worker
    threads = 0 if workers == 1 or dask_address else max(1, (os.cpu_count() or 1) // workers)
    plan = plan_segmentation(input, output, format, m, backend, threads, tta, scales, block, halo, overwrite)
    logger.info("model %s (%s, key %s) on %s %s (%s): TTA %s, scales %s, shift %s; %d blocks of %s, halo %d",
                m["source"], m["recipe"]["name"], m["key"], backend, m["precision"], m["precision_reason"], tta,
                scales, m["shift"],
                plan["blocks"],
                plan["settings"]["block"]
                if m["recipe"]["input_mode"] == "crop" else "a section", plan["settings"]["halo"])
    if plan["complete"]:
        summary = completed_summary(plan)
        logger.info("already complete: %s (nothing to do; --overwrite to recompute)", plan["output"])
        state = "already complete"
    else:
        t0 = time.perf_counter()
        todo = blocks_to_do(plan)
        logger.info("%d of %d blocks done, %d to go", plan["blocks"] - len(todo), plan["blocks"], len(todo))
        per_section = plan["blocks"] // plan["shape"][0]
        parallel = workers if not dask_address else _cluster_workers(dask_address)
        with task_runner(workers, dask_address) as runner:
            _run_all(runner, predict_blocks, "indices", plan, batches(todo, parallel, blocks_per_task), "blocks",
                     per_section)
            sections = sections_to_do(plan)
            _run_all(runner, label_sections, "sections", plan, batches(sections, parallel, None), "sections", 1)
        summary = finish_segmentation(plan, time.perf_counter() - t0)
        state = "computed"
    create_markdown_artifact(summary_markdown(summary, state), key="unet-segmentation",
                             description=f"Segmentation of {Path(input).name}")
    return summary


if __name__ == "__main__":
    from flows.segment_cli import run

    sys.exit(run())
