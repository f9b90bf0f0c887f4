"""The run's temporary Prefect server (flows/temporary_server.py): started in a session of its own, a
database migrated by an earlier start of the same Prefect is not checked again, flows run against it
through ``running_on``, and it is gone after ``stop``; the command line's early launch is stopped
when its checks fail. Real servers on a new Prefect home."""
from __future__ import annotations

import json
import os
import sqlite3

import httpx
import numpy as np
import psutil
import pytest
import tifffile

from flows.temporary_server import (MIGRATED_MARK, TemporaryServer, begin_temporary_server, running_on,
                                    schema_revision, skip_migrations, start_temporary_server)

pytestmark = pytest.mark.integration

SKIP_ENV = ("PREFECT_API_DATABASE_MIGRATE_ON_START", "false")


def _server_env(server) -> dict[str, str]:
    return psutil.Process(server.process.pid).environ()


def _stopped(server) -> None:
    pid = server.process.pid
    server.stop()
    assert server.process is None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_second_start_skips_the_migration_check_and_flows_run_on_the_server(tmp_path, monkeypatch, capsys):
    import flows.cli as cli
    from prefect import flow
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import (PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_API_URL,
                                  PREFECT_FLOWS_HEARTBEAT_FREQUENCY, PREFECT_HOME, temporary_settings)

    home = tmp_path / "home"
    database = home / "prefect.db"
    # a cluster's proxy (here one that refuses every connection) must not carry the run's calls to
    # its own server
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")

    @flow
    def tiny(x: int) -> int:
        return x + 1

    with temporary_settings(updates={PREFECT_HOME: str(home),
                                     PREFECT_API_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{database}"},
                            restore_defaults={PREFECT_API_URL}):
        assert begin_temporary_server(migrated_only=True) is None  # a new database: not launched early
        first = start_temporary_server()
        try:
            assert os.getsid(first.process.pid) != os.getsid(0)  # a session of its own
            assert SKIP_ENV not in _server_env(first).items()  # a new database: migrated
            mark = json.loads((home / MIGRATED_MARK).read_text())
            assert mark["revision"] == schema_revision(database) and mark["revision"]
        finally:
            _stopped(first)

        assert skip_migrations(home, database)
        second = start_temporary_server()
        try:
            assert SKIP_ENV in _server_env(second).items()
            url = os.environ.get("PREFECT_API_URL")
            with running_on(second):
                assert PREFECT_API_URL.value() == second.api_url == os.environ["PREFECT_API_URL"]
                assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() is None
                assert tiny(41) == 42
                APILogWorker.drain_all(timeout=10)  # its logs reach the server before it stops (at exit: Prefect's drain)
            assert os.environ.get("PREFECT_API_URL") == url and PREFECT_API_URL.value() is None
            runs = httpx.post(f"{second.api_url}/flow_runs/filter", json={}, trust_env=False).json()
            assert [r["state"]["type"] for r in runs] == ["COMPLETED"]
            logs = httpx.post(f"{second.api_url}/logs/filter", json={}, trust_env=False).json()
            assert any("Finished in state Completed" in log["message"] for log in logs)
        finally:
            _stopped(second)

        # The command line launches the server once the paths are checked, while it reads the
        # stacks: a stack that fails that check stops the server again, and the start lock is free.
        data = tmp_path / "bad"
        data.mkdir()
        frames = np.zeros((3, 64, 64), np.uint8)
        tifffile.imwrite(data / "train-volume.tif", frames)
        tifffile.imwrite(data / "train-labels.tif", np.full((2, 64, 64), 255, np.uint8))  # one frame short
        tifffile.imwrite(data / "test-volume.tif", frames)
        launched = []
        launch = TemporaryServer.launch
        monkeypatch.setattr(TemporaryServer, "launch", lambda self: launched.append(self) or launch(self))
        capsys.readouterr()
        code = cli.main(["--data-dir", str(data), "--work-dir", str(tmp_path / "work"), "--preset", "smoke"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1 and err[0].startswith("error: ") and "train-labels.tif" in err[0], err
        assert len(launched) == 1 and launched[0].process is None  # launched, then stopped
        assert not [p for p in psutil.process_iter(["cmdline"]) if str(launched[0].port) in (p.info["cmdline"] or [])]
        third = begin_temporary_server(migrated_only=True)  # the lock is free, the database still migrated
        try:
            assert third is not None and SKIP_ENV in _server_env(third.server).items()
        finally:
            third.cancel()
        assert third.server.process is None

        # What makes the next start migrate again: the database moved to another revision (another
        # Prefect migrated it), a record from another Prefect version, a new database, no record.
        assert skip_migrations(home, database)
        recorded = json.loads((home / MIGRATED_MARK).read_text())
        (home / MIGRATED_MARK).write_text(json.dumps({**recorded, "prefect": "0.0.0"}))
        assert not skip_migrations(home, database)
        (home / MIGRATED_MARK).write_text(json.dumps(recorded))
        with sqlite3.connect(database) as db:
            db.execute("UPDATE alembic_version SET version_num = 'another'")
        assert not skip_migrations(home, database)
        database.unlink()
        assert not skip_migrations(home, database)
        assert not skip_migrations(tmp_path / "no-home", database)


def test_running_on_no_server_changes_nothing():
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    before = (PREFECT_API_URL.value(), PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value(), os.environ.get("PREFECT_API_URL"))
    with running_on(None):
        assert (PREFECT_API_URL.value(), PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value(),
                os.environ.get("PREFECT_API_URL")) == before
