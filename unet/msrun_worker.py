"""What msrun runs on every rank: ``python -m unet.msrun_worker <out_dir>/logs/job.json``.

Joins the job (:func:`unet.distributed.init_data_parallel`; msrun's scheduler process stops
there), trains by the job's recipe with :func:`unet.train.train` and writes
``rank_<r>.json`` (the digest of the rank's weights, its peak memory) next to the job file. An exception is
written to ``rank_<r>.error`` as one line (the launcher reports it) and ends the rank with exit
code 1. Started by :func:`unet.distributed.launch` / ``python -m unet.distributed``, not by hand.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import sys
import traceback
from pathlib import Path

import unet  # noqa: F401  (sets the oneDNN ISA cap before mindspore loads)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m unet.msrun_worker JOB_JSON (started by msrun)", file=sys.stderr)
        return 2
    job_path = Path(argv[0])
    log_dir = job_path.parent

    from unet.distributed import init_data_parallel, rank_file

    group = init_data_parallel()  # the scheduler process never returns from here
    rank = group.rank
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"%(asctime)s rank {rank}/{group.size} %(name)s %(levelname)s %(message)s")
    log_dir.mkdir(parents=True, exist_ok=True)
    rank_file(log_dir, rank, "pid").write_text(str(os.getpid()))
    try:
        from unet.distributed import read_job
        from unet.recipes import Recipe
        from unet.train import train

        job = read_job(job_path)
        result = train(Recipe.from_dict(job["recipe"]), [tuple(map(Path, p)) for p in job["train"]],
                       [tuple(map(Path, p)) for p in job["val"]], Path(job["out_dir"]), resume=job["resume"],
                       group=group)
        rank_file(log_dir, rank, "json").write_text(json.dumps(
            {"rank": rank, "size": group.size, "weights_sha256": result.weights_sha256,
             "epochs_run": result.epochs_run, "label_shift": list(result.label_shift),
             "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
    except BaseException as exc:  # noqa: BLE001  (report whatever ends the rank, then fail)
        traceback.print_exc()
        line = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
        rank_file(log_dir, rank, "error").write_text(line + "\n")
        print(f"rank {rank} failed: {line}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
