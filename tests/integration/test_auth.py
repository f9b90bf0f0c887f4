"""An authenticated Prefect server, as docs/deployment.md ("Other hosts") sets it up: ``make server
SERVER_HOST=0.0.0.0`` with ``PREFECT_SERVER_API_AUTH_STRING`` on a free port; requests and the
events websocket without the string are refused, the Python client, the CLI and a worker with
``PREFECT_API_AUTH_STRING`` deploy and run a tiny flow to completion (its task run recorded through
the authenticated events websocket), and without the string ``make server`` on 0.0.0.0 refuses to
start in one line. The server is stopped with all its processes, also when a test fails."""
from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from test_deployments import Server, _alive, _descendants, client_for, free_port, run_deployment, started, tail, \
    wait_healthy

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]
POOL = "unet-pool"  # the pool run_deployment's worker polls
# make's prerequisite .venv/.installed counts as up to date: a pyproject.toml edited during the
# test must not make `make server` reinstall the venv
MAKE = ["make", "--no-print-directory", "-o", ".venv/.installed"]

TINY_FLOW = '''
from prefect import flow, task


@task
def square(x: int) -> int:
    return x * x


@flow
def tiny(x: int = 3) -> int:
    return square(x)
'''


def clean_env(tmp: Path) -> dict:
    """The environment without any Prefect setting of the caller, with a PREFECT_HOME of its own
    (so no profile of the caller's sets an auth string either)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp / "home"), PREFECT_LOCAL_STORAGE_PATH=str(tmp / "storage"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``make server SERVER_HOST=0.0.0.0`` with an auth string; ``env`` is a client's: the API on
    loopback and PREFECT_API_AUTH_STRING."""
    tmp = tmp_path_factory.mktemp("prefect-auth")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    auth = f"unet:{secrets.token_hex(8)}"
    env = clean_env(tmp)
    server_env = {**env, "PREFECT_SERVER_API_AUTH_STRING": auth, "PREFECT_API_URL": api, "PREFECT_UI_API_URL": api}
    log = tmp / "server.log"
    with started([*MAKE, "server", "SERVER_HOST=0.0.0.0", f"SERVER_PORT={port}"], server_env, log) as proc:
        wait_healthy(api, proc, log)  # /api/health answers without the string
        yield Server("sqlite", {**env, "PREFECT_API_URL": api, "PREFECT_API_AUTH_STRING": auth}, api, tmp)
        pids = [proc.pid, *_descendants(proc.pid)]
    assert not [pid for pid in pids if _alive(pid)], f"server processes left after teardown:\n{tail(log)}"


def status(url: str, auth: str | None = None, body: bytes | None = b"{}") -> int:
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                     headers={"Content-Type": "application/json"})
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def events_socket_reply(api: str, token: str | None) -> str:
    """What the server answers on the events websocket (/api/events/out) to the 'prefect' auth
    message carrying ``token``: its first message, or how it closed the connection."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with connect(api.replace("http://", "ws://") + "/events/out", subprotocols=["prefect"], open_timeout=30) as ws:
        ws.send(json.dumps({"type": "auth", "token": token}))
        try:
            return json.loads(ws.recv(timeout=30))["type"]
        except ConnectionClosed as closed:
            return f"closed {closed.rcvd.code}"


@pytest.mark.slow  # with the server's start: minutes on a loaded 2-core machine
@pytest.mark.ci_slice
def test_requests_without_the_auth_string_get_401(server):
    auth = server.env["PREFECT_API_AUTH_STRING"]
    assert status(f"{server.api}/flows/filter") == 401
    assert status(f"{server.api}/flows/filter", auth="unet:wrong") == 401
    assert status(f"{server.api}/flows/filter", auth=auth) == 200
    assert status(f"{server.api}/version", body=None) == 401
    assert status(f"{server.api}/health", body=None) == 200  # probes are exempt
    # Prefect 3.9 checks the string on its websockets too (upstream issue #17687, fixed)
    assert events_socket_reply(server.api, None) == "closed 1008"
    assert events_socket_reply(server.api, "unet:wrong") == "closed 1008"
    assert events_socket_reply(server.api, auth) == "auth_success"


@pytest.mark.slow  # with the server's start: minutes on a loaded 2-core machine
@pytest.mark.ci_slice
def test_a_worker_with_the_auth_string_runs_a_deployment(server):
    """The Python client deploys a one-task flow (in this process: a `prefect deploy` would cost
    another Prefect start-up), `prefect deployment run` and a `--run-once` worker, all with the
    client string, run it."""
    from prefect import Flow
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_AUTH_STRING, temporary_settings
    from prefect.workers.process import ProcessWorker

    source = server.tmp / "tiny"
    source.mkdir()
    (source / "tiny.py").write_text(TINY_FLOW)
    with temporary_settings({PREFECT_API_AUTH_STRING: server.env["PREFECT_API_AUTH_STRING"]}):
        with client_for(server.api) as client:
            client.create_work_pool(WorkPoolCreate(name=POOL, type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
            tiny = Flow.from_source(source=str(source), entrypoint="tiny.py:tiny")
            tiny.deploy(name="tiny", work_pool_name=POOL, print_next_steps=False)
        flow_run, log = run_deployment(server, "tiny/tiny", {"x": 7})  # fails unless Completed
        # the task run's states reach the server only as events over the /api/events/in websocket
        deadline, task_runs = time.monotonic() + 60, []
        with client_for(server.api) as client:
            while time.monotonic() < deadline and not (task_runs and task_runs[0].state
                                                       and task_runs[0].state.is_completed()):
                time.sleep(1)
                task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    assert [(t.name.split("-")[0], t.state and t.state.type.value) for t in task_runs] == [("square", "COMPLETED")], \
        f"{task_runs}\nworker log:\n{tail(log)}"
    worker_log = log.read_text()
    assert "Unauthorized" not in worker_log and "Unable to connect" not in worker_log, tail(log)


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.1.1", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.20", False), ("prefect-host", False)])
def test_only_loopback_addresses_start_without_the_auth_string(host, loopback):
    from flows.server import is_loopback

    assert is_loopback(host) is loopback


def test_make_server_on_0_0_0_0_without_the_auth_string_refuses_in_one_line(tmp_path):
    env = clean_env(tmp_path)
    port = free_port()
    log = tmp_path / "make-server.log"
    with started([*MAKE, "server", "SERVER_HOST=0.0.0.0", f"SERVER_PORT={port}"], env, log) as proc:
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"make server without the auth string still runs after 120 s:\n{tail(log)}")
        assert not _descendants(proc.pid)
    output = log.read_text()
    assert proc.returncode != 0, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "PREFECT_SERVER_API_AUTH_STRING" in errors[0], output
    assert "Traceback" not in output and "Uvicorn" not in output, output
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, f"something listens on port {port}"

    # the script alone: exactly that one line, nothing on stdout; a blank string counts as none
    done = subprocess.run([sys.executable, "-m", "flows.server", "--host", "0.0.0.0", "--port", str(port)], cwd=REPO,
                          env={**env, "PREFECT_SERVER_API_AUTH_STRING": " "}, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert (done.returncode, done.stdout, done.stderr.splitlines()) == (2, "", errors), done.stderr
