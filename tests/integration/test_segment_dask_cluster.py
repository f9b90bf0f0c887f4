"""segment-volume on an external Dask cluster, as on other hosts but on loopback: a Prefect
server, a ``dask scheduler`` and two ``dask worker`` processes started as separate processes; the
CLI segments through ``--dask-address`` and the result equals the one-process result bit for bit.
Every process started here is stopped in a teardown, by process group, also when the test fails."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import zarr

from test_deployments import free_port, started, tail, wait_healthy

# slow: CI's slice has the same path through a deployment (test_deployments.py's
# test_segment_volume_deployment_runs_on_a_dask_cluster); `make test-all` runs this one too.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def wait_for_workers(address: str, count: int, log: Path, timeout: float = 120) -> None:
    from distributed import Client

    deadline = time.monotonic() + timeout
    with Client(address, timeout=30) as client:
        while time.monotonic() < deadline:
            if len(client.scheduler_info()["workers"]) >= count:
                return
            time.sleep(0.5)
    pytest.fail(f"fewer than {count} Dask workers after {timeout:.0f} s:\n{tail(log)}")


def run(cmd: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_segment_through_an_external_dask_cluster_equals_one_process(isbi_dir, tmp_path):
    port, scheduler_port = free_port(), free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PATH=f"{BIN}:{env.get('PATH', '')}")
    address = f"tcp://127.0.0.1:{scheduler_port}"
    work = tmp_path / "work"
    with ExitStack() as stack:
        server = stack.enter_context(started([sys.executable, "-m", "prefect", "server", "start", "--host",
                                              "127.0.0.1", "--port", str(port)], env, tmp_path / "server.log"))
        wait_healthy(api, server, tmp_path / "server.log")
        # a model to apply: the smoke pipeline, through the same server
        run([sys.executable, "flows/full_pipeline.py", "--preset", "smoke", "--data-dir", str(isbi_dir),
             "--work-dir", str(work)], env)
        stack.enter_context(started([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port",
                                     str(scheduler_port), "--no-dashboard"], env, tmp_path / "scheduler.log"))
        for i in range(2):
            stack.enter_context(started([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1",
                                         "--no-dashboard", "--name", f"host{i}"], env, tmp_path / f"worker{i}.log"))
        wait_for_workers(address, 2, tmp_path / "scheduler.log")
        volume = str(isbi_dir / "test-volume.tif")
        one = run([sys.executable, "flows/segment.py", volume, "--work-dir", str(work), "--output",
                   str(tmp_path / "one.ome.zarr")], env)
        cluster = run([sys.executable, "flows/segment.py", volume, "--work-dir", str(work), "--output",
                       str(tmp_path / "cluster.ome.zarr"), "--dask-address", address, "--blocks-per-task", "3"], env)
    assert "segmentation" in one.stdout and "segmentation" in cluster.stdout
    a, b = (zarr.open_group(str(tmp_path / name), mode="r") for name in ("one.ome.zarr", "cluster.ome.zarr"))
    for key in ("0", "labels/mask/0", "labels/cells/0"):
        np.testing.assert_array_equal(a[key][:], b[key][:])
    # the blocks were computed by both worker processes, not by the command's own process
    marks = (tmp_path / "cluster.ome.zarr" / ".segment" / "blocks").iterdir()
    pids = {json.loads(p.read_text())["pid"] for p in marks if not p.name.startswith(".")}
    print(f"blocks computed by worker processes {sorted(pids)}")
    assert len(pids) == 2
