"""What msrun runs on every rank: ``python -m unet.msrun_worker <out_dir>/logs/job.json [--data-dir DIR]
[--node-rank K]``.

Dies with msrun (its parent; a SIGKILL of msrun, as when a host goes down, leaves no rank behind),
joins the job (:func:`unet.parallel.init_data_parallel`; msrun's scheduler process stops
there), trains by the job's recipe with :func:`unet.train.train` and writes
``rank_<r>.json`` (the digest of the rank's weights, its peak memory) next to the job file. An exception is
written to ``rank_<r>.error`` as one line (the launcher reports it) and ends the rank with exit
code 1. ``--data-dir``: this host's copy of the job's data folder (default: the folder node 0
used). Started by :func:`unet.distributed.launch` / ``python -m unet.distributed``, not by hand.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import traceback
from pathlib import Path

import unet  # noqa: F401  (sets the oneDNN ISA cap before mindspore loads)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unet.msrun_worker", description="a rank of an msrun job "
                                "(started by msrun, not by hand)")
    p.add_argument("job")
    p.add_argument("--data-dir", type=Path, help="this host's copy of the job's data folder")
    p.add_argument("--node-rank", type=int, default=0, help="the msrun node this process belongs to")
    args = p.parse_args(argv)
    log_dir = Path(args.job).parent

    from unet.distributed import die_with_parent, job_pairs, rank_file, read_job
    from unet.parallel import init_data_parallel

    die_with_parent()  # msrun's ranks and scheduler: a killed msrun must not leave them running
    if os.environ.get("MS_ROLE") == "MS_SCHED" and args.node_rank > 0:
        # msrun starts a scheduler on every host whose address is the master address; a second
        # node on the master's host (two nodes on one machine, loopback) must leave it to node 0's
        print(f"node {args.node_rank}: the job's scheduler runs on node 0; this copy is not needed", flush=True)
        return 0
    group = init_data_parallel()  # the scheduler process never returns from here
    rank = group.rank
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"%(asctime)s rank {rank}/{group.size} %(name)s %(levelname)s %(message)s")
    log_dir.mkdir(parents=True, exist_ok=True)
    rank_file(log_dir, rank, "pid").write_text(str(os.getpid()))
    try:
        from unet.recipes import Recipe
        from unet.train import train

        job = read_job(args.job)
        result = train(Recipe.from_dict(job["recipe"]), job_pairs(job, "train", args.data_dir),
                       job_pairs(job, "val", args.data_dir), Path(job["out_dir"]), resume=job["resume"], group=group)
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
