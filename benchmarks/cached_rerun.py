"""Where the seconds of an all-cached smoke pipeline rerun go, run as a whole process
(``python flows/full_pipeline.py ... --preset smoke`` with every stage cached): (a) against a running
server (``PREFECT_API_URL`` set to a ``prefect server start`` this script starts and stops) and (b)
in ephemeral mode (the run starts Prefect's temporary server itself). Without ``--work-dir`` the
first (untimed-phase) run computes a new smoke work dir: its wall time is printed too.

    .venv/bin/python benchmarks/cached_rerun.py --repeats 3
    .venv/bin/python benchmarks/cached_rerun.py --work-dir /work/runs/smoke   # reuse a computed work dir

Each timed run is the real command line (``flows.cli``) in a fresh process whose phases are timed
from inside (the script runs itself as that process, ``--child``): interpreter start and the command
line's imports (light: ``flows.cli``); the checks, during which the temporary server is launched and
the flow's modules import (``checks_and_imports``); the wait for the server to answer after them
(``server_wait``); the flow run, split into the stages' task calls and the rest (flow-run
bookkeeping: creating the run, its logs, artifacts, the final state); and exit (the temporary
server's stop). ``server_start`` is the server's own start, launch to answer, which overlaps the
checks. The import split is ``python -X importtime`` of the flow's imports. A first run in each mode (not timed) computes or
reuses the stages and migrates the fresh Prefect database.
"""
from __future__ import annotations

import argparse
import json
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

FLOW_TASKS = ("call_stage", "read_champion", "promote_champion", "export_champion", "build_summary",
              "write_summary", "publish_artifacts")


def child(argv: list[str], phases_file: str) -> int:
    """The pipeline's command line with its phases timed; the times go to ``phases_file``."""
    marks = {"start": time.perf_counter()}
    import flows.cli as cli
    import flows.temporary_server as temporary
    marks["imported"] = time.perf_counter()
    spans: dict[str, float] = {}

    def timed(owner, name: str, label: str) -> None:
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            marks.setdefault(f"{label}_start", t0)
            try:
                return real(*args, **kwargs)
            finally:
                spans[label] = spans.get(label, 0.0) + time.perf_counter() - t0
                marks.setdefault(f"{label}_end", time.perf_counter())
        setattr(owner, name, wrapper)

    # the flow's module is imported by the checks (while the server starts): its functions are
    # timed once the checks are done, before the run
    real_run_command = cli.run_command

    def run_command(debug, check, run, kept):
        def timed_run():
            marks["checked"] = time.perf_counter()
            import flows.full_pipeline as pipeline
            timed(pipeline, "full_pipeline", "flow")
            for name in FLOW_TASKS:
                timed(pipeline, name, "tasks")
            return run()
        return real_run_command(debug, check, timed_run, kept)

    cli.run_command = run_command
    timed(temporary.TemporaryServer, "launch", "launch")
    timed(temporary.ServerStart, "ready", "server_wait")  # launched during the checks
    timed(temporary, "start_temporary_server", "server_wait")  # launched after them (a database to migrate)
    code = cli.main(argv)
    marks["end"] = time.perf_counter()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as flows.cli.run
    launched = marks.get("launch_start")
    Path(phases_file).write_text(json.dumps({
        "code": code, "imports": marks["imported"] - marks["start"],
        "checks_and_imports": marks.get("checked", marks["end"]) - marks["imported"],
        "server_wait": spans.get("server_wait", 0.0),
        "server_start": 0.0 if launched is None else marks["server_wait_end"] - launched,
        "flow": spans.get("flow", 0.0), "flow_tasks": spans.get("tasks", 0.0),
        "in_process": marks["end"] - marks["start"], "in_process_start": marks["start"]}))
    return code


def timed_run(cmd: list[str], env: dict, phases_file: Path, cached: bool = True) -> dict:
    t0 = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    if cached and "Completed (" in done.stdout:  # a stage computed: not an all-cached rerun
        raise RuntimeError(f"not a cached rerun:\n{done.stdout[-2000:]}")
    phases = json.loads(phases_file.read_text())
    phases["wall"] = wall
    # interpreter start before the first line of child(), and exit after its last (atexit hooks:
    # the temporary server's stop)
    phases["startup_and_exit"] = wall - phases["in_process"]
    phases["flow_bookkeeping"] = phases["flow"] - phases["flow_tasks"]
    return phases


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(cmd: list[str], env: dict, repeats: int, phases_file: Path) -> dict:
    first = timed_run(cmd, env, phases_file, cached=False)  # stages computed or reused, the database migrated
    runs = [timed_run(cmd, env, phases_file) for _ in range(repeats)]
    return {**{k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]
               if k not in ("code", "in_process_start")},
            "first_run_wall": round(first["wall"], 2), "cached_walls": [round(r["wall"], 2) for r in runs]}


def import_split() -> dict:
    """Cumulative import seconds of the heaviest packages behind ``import flows.cli, flows.full_pipeline``
    (``python -X importtime``), and of ``import mindspore`` alone."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import flows.cli, flows.full_pipeline"],
                          cwd=common.REPO,
                          capture_output=True, text=True)
    cumulative = {}
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cum, name = (part.strip() for part in line.split("|"))
        if not cum.isdigit():
            continue
        top = name.strip().split(".")[0]
        if name.strip() == top:  # a top-level package: its cumulative time includes what it imported first
            cumulative[top] = cumulative.get(top, 0) + int(cum) / 1e6
    heavy = dict(sorted(cumulative.items(), key=lambda kv: -kv[1])[:8])
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import unet, mindspore"], cwd=common.REPO, check=True)
    mindspore_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    bare = time.perf_counter() - t0
    return {"flow_imports_heaviest_s": {k: round(v, 2) for k, v in heavy.items()},
            "python_startup_s": round(bare, 2), "import_mindspore_process_s": round(mindspore_s, 2)}


def main() -> None:
    if sys.argv[1:2] == ["--child"]:  # a timed run: the rest is the pipeline's command line
        sys.exit(child(sys.argv[3:], sys.argv[2]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(common.REPO.parent / "shared" / "data" / "isbi2012"))
    p.add_argument("--work-dir", help="a smoke work directory to rerun (default: a new one, computed first)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PREFECT_HOME": f"{tmp}/home", "PREFECT_LOCAL_STORAGE_PATH": f"{tmp}/home/storage",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(common.REPO)}
        env.pop("PREFECT_API_URL", None)
        phases_file = Path(tmp) / "phases.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(phases_file), "--data-dir",
               args.data_dir, "--work-dir", args.work_dir or f"{tmp}/work", "--preset", "smoke"]
        ephemeral = measure(cmd, env, args.repeats, phases_file)

        port = free_port()
        server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
                                   "127.0.0.1", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}/api"
            t0 = time.perf_counter()
            for _ in range(240):
                try:
                    urllib.request.urlopen(f"{url}/health", timeout=1)
                    break
                except OSError:
                    time.sleep(0.25)
            server_ready = time.perf_counter() - t0
            served = measure(cmd, {**env, "PREFECT_API_URL": url}, args.repeats, phases_file)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    imports = import_split()
    rows = ("wall", "startup_and_exit", "imports", "checks_and_imports", "server_wait", "flow", "flow_tasks",
            "flow_bookkeeping", "server_start")
    print(f"all-cached smoke rerun as a process, median of {args.repeats} (seconds)")
    print("| phase | running server | ephemeral |")
    print("|---|---|---|")
    for k in rows:
        print(f"| {k} | {served[k]} | {ephemeral[k]} |")
    print(f"`prefect server start` until /health answers: {server_ready:.1f} s")
    print(f"first run (stages {'reused' if args.work_dir else 'computed'}): ephemeral {ephemeral['first_run_wall']} s, "
          f"running server {served['first_run_wall']} s; cached walls: ephemeral {ephemeral['cached_walls']}, "
          f"running server {served['cached_walls']}")
    print(f"imports: {json.dumps(imports)}")
    common.emit({"benchmark": "cached_rerun", "server": served, "ephemeral": ephemeral,
                 "server_ready_s": round(server_ready, 2), **imports})


if __name__ == "__main__":
    main()
