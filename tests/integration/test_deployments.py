"""prefect.yaml end to end against a real Prefect server, once on SQLite and once on PostgreSQL:
start the server, create the work pool, ``prefect deploy --all`` from the repository root, run the
``full-pipeline`` deployment with the smoke preset on the real ISBI volumes through a process
worker, read the artifacts back, rerun through ``retrain-weekly`` (all Cached, champion unchanged)
and check the weekly schedule. Every process started here is stopped in a teardown, by process
group, also when a test fails; a PostgreSQL cluster started here is stopped again."""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]
POOL = "unet-pool"
STAGES = ["extract", "split", "datasets", "train", "evaluate", "predict"]
OUR_ROWS = ["train (ours, training eval)", "val (ours, training eval)", "val (ours, native size)"]


# --- processes ---------------------------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the process's group (it was started in its own session) and any descendant that
    moved to another group (the worker starts flow runs in their own session), then SIGKILL
    whatever is left after ``grace`` seconds."""
    if proc.poll() is not None and not _descendants(proc.pid):
        return
    pids = [proc.pid, *_descendants(proc.pid)]
    groups = {proc.pid}
    for pid in pids:
        with _suppress():
            groups.add(os.getpgid(pid))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            with _suppress():
                os.killpg(group, sig)
        for pid in pids:
            with _suppress():
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (proc.poll() is None or any(_alive(p) for p in pids[1:])):
            time.sleep(0.2)
        if proc.poll() is not None and not any(_alive(p) for p in pids[1:]):
            return
    proc.wait(timeout=10)


@contextmanager
def _suppress():
    try:
        yield
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def started(cmd: list[str], env: dict, log: Path, cwd: Path = REPO):
    """A background process in its own session, its output in ``log``, stopped on exit."""
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc)


def tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def cli(args: list[str], env: dict, timeout: float = 120) -> str:
    done = subprocess.run([*PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"prefect server exited with {proc.returncode}:\n{tail(log)}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prefect server not healthy after {timeout:.0f} s:\n{tail(log)}")


# --- PostgreSQL ----------------------------------------------------------------------------------

def as_postgres(cmd: list[str]) -> list[str]:
    return (["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else ["sudo", "-n", "-u", "postgres"]) + cmd


def psql(sql: str, port: int, database: str = "postgres") -> str:
    done = subprocess.run(as_postgres(["psql", "-p", str(port), "-d", database, "-v", "ON_ERROR_STOP=1", "-qtA",
                                       "-c", sql]),
                          cwd="/", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"psql {sql!r} failed: {done.stderr}"
    return done.stdout


def debian_cluster() -> tuple[str, str, int, str]:
    """(version, name, port, status) of the first cluster ``pg_lsclusters`` lists, 'main' first."""
    installed = shutil.which("pg_ctlcluster") and any(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if not installed:
        reason = "PostgreSQL is not installed (apt-get install postgresql; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: the PostgreSQL case must run in CI")
        pytest.skip(reason)
    rows = [line.split() for line in subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True,
                                                     check=True).stdout.splitlines() if line.strip()]
    assert rows, "postgresql is installed but has no cluster (pg_createcluster 15 main)"
    rows.sort(key=lambda r: r[1] != "main")
    version, name, port, status = rows[0][:4]
    return version, name, int(port), status


@contextmanager
def postgres_database():
    """A throw-away role and database on the Debian cluster (started if it is down, and stopped
    again at the end); yields the SQLAlchemy URL Prefect's server takes."""
    version, name, port, status = debian_cluster()
    started_here = status != "online"
    if started_here:
        subprocess.run(["pg_ctlcluster", version, name, "start"], check=True, timeout=120)
    suffix = f"{os.getpid()}_{secrets.token_hex(3)}"
    role = db = f"unet_it_{suffix}"
    password = secrets.token_hex(16)
    try:
        psql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'", port)
        psql(f"CREATE DATABASE {db} OWNER {role}", port)
        # The migrations run CREATE EXTENSION pg_trgm: a trusted extension since PostgreSQL 13,
        # so CREATE on the database (which its owner has) is all the role needs.
        psql(f"GRANT CREATE ON DATABASE {db} TO {role}", port)
        yield f"postgresql+asyncpg://{role}:{password}@127.0.0.1:{port}/{db}", port, db
    finally:
        try:
            psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)", port)
            psql(f"DROP ROLE IF EXISTS {role}", port)
        finally:
            if started_here:
                subprocess.run(["pg_ctlcluster", version, name, "stop"], check=False, timeout=120)


# --- fixtures ----------------------------------------------------------------------------------

@dataclass
class Server:
    backend: str
    env: dict  # of every prefect process here: server, CLI, workers (and so the flow runs)
    api: str
    tmp: Path
    postgres: tuple[int, str] | None = None  # (port, database) of the PostgreSQL case


@contextmanager
def _no_database():
    yield None


# CI's slice runs the PostgreSQL server only (the multi-host setup); `make test-all` adds SQLite.
@pytest.fixture(scope="module", params=["postgresql", pytest.param("sqlite", marks=pytest.mark.slow)])
def server(request, tmp_path_factory):
    """A ``prefect server start`` on a free loopback port with its own PREFECT_HOME and result
    storage, on SQLite (``$PREFECT_HOME/prefect.db``) or on a PostgreSQL database of its own."""
    tmp = tmp_path_factory.mktemp(f"prefect-{request.param}")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp / "home"), PREFECT_LOCAL_STORAGE_PATH=str(tmp / "storage"),
               PREFECT_API_URL=api, PREFECT_UI_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    with (postgres_database() if request.param == "postgresql" else _no_database()) as database:
        postgres = None
        if database is not None:
            url, pg_port, db = database
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = url
            postgres = (pg_port, db)
        log = tmp / "server.log"
        with started([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log) as proc:
            wait_healthy(api, proc, log)
            yield Server(request.param, env, api, tmp, postgres)


@contextmanager
def client_for(api: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        with get_client(sync_client=True) as client:
            yield client


@pytest.fixture(scope="module")
def deployed(server, isbi_dir):
    """The pool created and both deployments of prefect.yaml deployed, as `make deploy` does."""
    cli(["work-pool", "create", POOL, "--type", "process"], server.env)
    out = cli(["--no-prompt", "deploy", "--all"], {**server.env, "UNET_DATA_DIR": str(isbi_dir)}, timeout=180)
    assert "full-pipeline/full-pipeline" in out and "full-pipeline/retrain-weekly" in out, out
    assert "segment-volume/segment-volume" in out, out
    return server


def run_deployment(server: Server, deployment: str, params: dict):
    """Create a run of ``deployment`` due now, let a ``--run-once`` worker execute it (a worker
    only picks up runs due within a few seconds, so the run comes first), and return the finished
    flow run and the worker's log."""
    args = ["deployment", "run", deployment]
    for key, value in params.items():
        args += ["-p", f"{key}={value}"]
    out = cli(args, server.env)
    match = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert match, out
    log = server.tmp / f"worker-{match.group(1)}.log"
    with started([*PREFECT, "worker", "start", "--pool", POOL, "--run-once"], server.env, log) as worker:
        try:
            worker.wait(timeout=240)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not finish within 240 s:\n{tail(log)}")
    with client_for(server.api) as client:
        flow_run = client.read_flow_run(match.group(1))
    if flow_run.state is None or not flow_run.state.is_completed():
        state = flow_run.state
        pytest.fail(f"flow run {flow_run.name} ended {state and state.name}: {state and state.message}\n"
                    f"worker log:\n{tail(log, 80)}")
    return flow_run, log


def smoke(isbi_dir: Path, work: Path) -> dict:
    return {"data_dir": isbi_dir, "preset": "smoke", "work_dir": work}


@pytest.fixture(scope="module")
def first_run(deployed, isbi_dir):
    work = deployed.tmp / "work"
    flow_run, log = run_deployment(deployed, "full-pipeline/full-pipeline", smoke(isbi_dir, work))
    return flow_run, work, log


def summary_of(work: Path, flow_run) -> dict:
    return json.loads((work / "runs" / flow_run.name / "summary.json").read_text())


def states(summary: dict) -> dict:
    return {name: stage["state"] for name, stage in summary["stages"].items()}


def artifacts(api: str, key: str, flow_run_id) -> list:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with client_for(api) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


# --- tests -------------------------------------------------------------------------------------

def test_deployments_pull_from_this_clone_and_retrain_weekly_is_scheduled(deployed, isbi_dir):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, \
        FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    with client_for(deployed.api) as client:
        manual = client.read_deployment_by_name("full-pipeline/full-pipeline")
        weekly = client.read_deployment_by_name("full-pipeline/retrain-weekly")
        for d in (manual, weekly):
            assert d.work_pool_name == POOL
            assert d.entrypoint == "flows/full_pipeline.py:full_pipeline"
            # resolved when deploying: the clone `prefect deploy` ran in, wherever it is
            assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
        assert manual.schedules == [] and manual.parameters == {}
        assert weekly.parameters == {"data_dir": str(isbi_dir), "preset": "seed", "work_dir": "artifacts"}
        assert [(s.schedule.cron, s.active) for s in weekly.schedules] == [("0 3 * * 1", True)]
        # the server's scheduler fills in upcoming runs a few seconds after a deployment changes
        deadline, upcoming = time.monotonic() + 60, []
        while not upcoming and time.monotonic() < deadline:
            time.sleep(1)
            upcoming = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[weekly.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
    assert upcoming, "retrain-weekly has no scheduled runs 60 s after deploying"
    now = datetime.now(timezone.utc)
    for run in upcoming:
        when = run.expected_start_time.astimezone(timezone.utc)
        assert when > now and (when.weekday(), when.hour, when.minute) == (0, 3, 0), when  # Mondays 03:00
        assert run.parameters == weekly.parameters


def test_smoke_run_on_a_worker_publishes_the_artifacts(first_run, deployed):
    flow_run, work, log = first_run
    assert "set_working_directory" in log.read_text()
    summary = summary_of(work, flow_run)
    assert states(summary) == {name: "Completed" for name in STAGES}
    assert summary["champion"]["decision"] == "promoted"
    found = artifacts(deployed.api, "unet-metrics", flow_run.id)
    assert len(found) == 1 and found[0].type == "table"
    rows = found[0].data if isinstance(found[0].data, list) else json.loads(found[0].data)
    by_set = {row["set"]: row for row in rows}
    assert set(OUR_ROWS) <= set(by_set)
    for label in OUR_ROWS:
        assert all(0.0 <= by_set[label][k] <= 1.0 for k in ("acc", "iou", "dice", "sens", "spec")), by_set[label]
    assert by_set["val (ours, native size)"]["iou"] == round(summary["metrics"]["val_native"]["iou"], 4)
    assert 0.0 <= by_set["val (ours, native size)"]["v_rand"] <= 1.0
    for key in ("unet-training-history", "unet-report", "unet-champion"):
        assert len(artifacts(deployed.api, key, flow_run.id)) == 1, key


def test_retrain_weekly_on_unchanged_data_is_all_cached_and_keeps_the_champion(first_run, deployed, isbi_dir):
    first, work, _ = first_run
    flow_run, _ = run_deployment(deployed, "full-pipeline/retrain-weekly", smoke(isbi_dir, work))
    summary = summary_of(work, flow_run)
    assert states(summary) == {name: "Cached" for name in STAGES}
    assert summary["metrics"] == summary_of(work, first)["metrics"]
    assert summary["champion"]["decision"] == "unchanged"
    champion = artifacts(deployed.api, "unet-champion", flow_run.id)
    assert len(champion) == 1 and "**unchanged**" in champion[0].data


@pytest.mark.slow  # about 70 s: out of CI's slice (make test-all runs it)
def test_segment_volume_deployment_runs_on_a_dask_cluster(first_run, deployed, isbi_dir):
    """The segment-volume deployment, triggered through the API and run by a process worker, whose
    flow sends its blocks to an external Dask cluster (a scheduler and two workers started as
    separate processes, as on other hosts) that reports to the same server."""
    import numpy as np
    import tifffile
    import zarr

    flow_run_1, work, _ = first_run
    out = deployed.tmp / "test-volume.ome.zarr"
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = str(Path(sys.executable).with_name("dask"))
    with contextlib.ExitStack() as stack:
        stack.enter_context(started([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                                    deployed.env, deployed.tmp / "dask-scheduler.log"))
        for i in range(2):
            stack.enter_context(started([dask, "worker", address, "--nthreads", "1", "--no-dashboard"],
                                        deployed.env, deployed.tmp / f"dask-worker{i}.log"))
        flow_run, _ = run_deployment(deployed, "segment-volume/segment-volume",
                                     {"input": isbi_dir / "test-volume.tif", "output": out, "work_dir": work,
                                      "dask_address": address, "blocks_per_task": 3})
    done = json.loads((out / ".segment" / "complete.json").read_text())
    assert done["shape"] == [30, 512, 512] and done["model"] == f"champion of {work}"
    pids = {json.loads(p.read_text())["pid"] for p in (out / ".segment" / "blocks").iterdir()
            if not p.name.startswith(".")}
    assert len(pids) == 2  # both Dask workers computed blocks
    predicted = summary_of(work, flow_run_1)["stages"]["predict"]["output"]
    expected = tifffile.imread(Path(predicted) / "test" / "probabilities.tif")
    assert np.abs(zarr.open_group(str(out), mode="r")["0"][:] - expected).max() <= 1e-5
    report = artifacts(deployed.api, "unet-segmentation", flow_run.id)
    assert len(report) == 1 and "30 sections of 512 x 512" in report[0].data


def test_the_runs_are_in_the_chosen_database(first_run, deployed):
    """The server really used the backend under test (a misspelt setting falls back to SQLite)."""
    flow_run = first_run[0]
    sqlite_file = Path(deployed.env["PREFECT_HOME"]) / "prefect.db"
    if deployed.backend == "sqlite":
        assert sqlite_file.is_file()
        return
    port, db = deployed.postgres
    assert not sqlite_file.exists()
    assert psql("SELECT extname FROM pg_extension WHERE extname = 'pg_trgm'", port, db).strip() == "pg_trgm"
    assert psql(f"SELECT state_type FROM flow_run WHERE id = '{flow_run.id}'", port, db).strip() == "COMPLETED"
    assert int(psql("SELECT count(*) FROM artifact WHERE key = 'unet-metrics'", port, db)) >= 1
