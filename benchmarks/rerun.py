"""Wall time of a fully cached pipeline rerun (smoke preset) as a whole process: with the
temporary (ephemeral) Prefect server, and against a running `prefect server start`.

    .venv/bin/python benchmarks/rerun.py --data-dir ../shared/data/isbi2012 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import common

FLOW = str(common.REPO / "flows" / "full_pipeline.py")


def timed_run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return time.perf_counter() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(cmd: list[str], env: dict, repeats: int) -> dict:
    first = timed_run(cmd, env)  # computes (or reuses) every stage
    times = [timed_run(cmd, env) for _ in range(repeats)]
    return {"first_s": round(first, 2), "cached_median_s": round(statistics.median(times), 2),
            "cached_runs_s": [round(t, 2) for t in times]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(common.REPO.parent / "shared" / "data" / "isbi2012"))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PREFECT_HOME": f"{tmp}/home", "PREFECT_LOCAL_STORAGE_PATH": f"{tmp}/home/storage",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)
        cmd = [sys.executable, FLOW, "--data-dir", args.data_dir, "--work-dir", f"{tmp}/work", "--preset", "smoke"]
        ephemeral = measure(cmd, env, args.repeats)

        port = free_port()
        server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
                                   "127.0.0.1", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}/api"
            for _ in range(120):
                try:
                    urllib.request.urlopen(f"{url}/health", timeout=1)
                    break
                except OSError:
                    time.sleep(0.5)
            served = measure(cmd, {**env, "PREFECT_API_URL": url}, args.repeats)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    common.emit({"benchmark": "rerun", "preset": "smoke", "ephemeral": ephemeral, "server": served})


if __name__ == "__main__":
    main()
