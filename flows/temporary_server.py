"""Prefect's temporary server for a command line that has no ``PREFECT_API_URL``: one per run, on
``$PREFECT_HOME``'s database, in a session of its own, gone when the run ends.

Prefect would start the same server itself (``prefect.server.api.server.SubprocessASGIServer``, the
same uvicorn command and environment), but only after importing the server's whole application into
the run's process to reach that class (1.6 s here), always running the database's migration check
(0.9 s) and in the run's process group. Starting it here, and pointing the flow at it with
``PREFECT_API_URL`` (:func:`running_on`), the run's process imports no server code, a database that a
start of the same Prefect left at its schema's head is not checked again, and a signal to the run's
process group reaches the run alone (:class:`TemporaryServer`). The command line launches it
(:func:`begin_temporary_server`) as soon as the input paths are checked and waits for it
(:meth:`ServerStart.ready`) only after the stacks are read and the flow's modules imported, so the
server's seconds of start-up overlap the run's own. ``benchmarks/cached_rerun.py`` measures what
this saves.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from flows.watchdog import watch_for_orphans
from tasks.stage import _locked

logger = logging.getLogger("prefect")  # the logger Prefect's own server start and stop log to

MIGRATED_MARK = ".temporary-server-migrated.json"
PORT_IN_USE = 3  # uvicorn's exit code when it cannot bind its port (taken between our check and its bind)


class TemporaryServer:
    """Prefect's server as ``SubprocessASGIServer`` runs it (uvicorn on 127.0.0.1, UI off,
    ``PREFECT__SERVER_EPHEMERAL``), started in a session of its own: a signal to the run's process
    group (Ctrl-C in a terminal, a supervisor's stop) then reaches the run alone, which reports its
    end to the server and stops it, instead of the server dying under a run still talking to it
    (measured before: exit 1 after 149 s of "Connection refused"). Stopped by :meth:`stop`, by an
    ``atexit`` hook, or by the watchdog (flows/watchdog.py) when the run is killed."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = env or {}
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self._launched = 0.0
        self._answered = False  # it logs its stop only then

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.address}/api"

    def _command(self) -> list[str]:
        import prefect

        return [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
                "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", "error", "--lifespan", "on"]

    def _environment(self) -> dict[str, str]:
        from prefect.settings import get_current_settings

        return {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                "PREFECT__SERVER_FINAL": "1", **get_current_settings().to_environment_variables(exclude_unset=True),
                **self.env}

    def launch(self) -> TemporaryServer:
        """Start the server's process on a free port and return at once; :meth:`wait` for it."""
        if self.port is None:
            atexit.register(self.stop)
        self.port = _free_port()
        self.process = subprocess.Popen(self._command(), env=self._environment(), start_new_session=True)
        self._launched = time.monotonic()
        return self

    def wait(self) -> TemporaryServer:
        """Return once the launched server answers ``/health`` (a server whose port was taken
        between our check and its bind is launched again on another); raises RuntimeError (with the
        server's exit code) when it exits first or does not answer within Prefect's start-up timeout
        (``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``) of its launch."""
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        timeout = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        for attempt in range(10):
            if attempt:
                self.launch()
            # logged here, not at the launch: a launch the run's checks cancel says nothing
            logger.info("Starting temporary server on %s", self.address)
            while (code := self.process.poll()) is None:
                if _answers(f"{self.api_url}/health"):
                    self._answered = True
                    return self
                if time.monotonic() > self._launched + timeout:
                    self.stop()
                    raise RuntimeError(f"Prefect's temporary server did not answer on {self.address} within "
                                       f"{timeout} s (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")
                time.sleep(0.05)
            self.process = None
            if code != PORT_IN_USE:
                raise RuntimeError(f"Prefect's temporary server exited with code {code} while starting "
                                   f"(its error is above)")
        raise RuntimeError("Prefect's temporary server found no free port in 10 attempts")

    def start(self) -> TemporaryServer:
        """:meth:`launch` and :meth:`wait`."""
        return self.launch().wait()

    def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after 5 s, as Prefect does); nothing when stopped."""
        process, self.process = self.process, None
        if process is None:
            return
        if self._answered:
            logger.info("Stopping temporary server on %s", self.address)
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never goes through http_proxy


def _answers(url: str) -> bool:
    try:
        with _DIRECT.open(url, timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def sqlite_database() -> Path | None:
    """The server's database file when it is SQLite (Prefect's default, ``$PREFECT_HOME/prefect.db``),
    else None."""
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    url = PREFECT_API_DATABASE_CONNECTION_URL.value() or ""
    prefix = "sqlite+aiosqlite:///"
    if not url.startswith(prefix) or ":memory:" in url:
        return None
    return Path(url[len(prefix):]).expanduser()


def schema_revision(database: Path) -> str | None:
    """The Alembic revision the SQLite ``database`` is at; None when it has none (new, or not
    Prefect's). Read-only."""
    if not database.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)) as db:
            rows = db.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.Error:
        return None
    return rows[0][0] if len(rows) == 1 else None


def migrated_state(database: Path) -> dict:
    """What a server start that ran Prefect's migrations records: this Prefect's version, the
    database, and the revision the start left it at (the schema's head for this Prefect)."""
    import prefect

    return {"prefect": prefect.__version__, "database": str(database), "revision": schema_revision(database)}


def skip_migrations(home: Path, database: Path | None) -> bool:
    """Whether the server can start without Prefect's migration check: the database is SQLite and at
    the revision recorded after a start of the same Prefect version that migrated it. A new or
    replaced database at another revision, another Prefect version, a database another Prefect moved
    on, a missing or unreadable record: the server migrates (and the record is written again)."""
    if database is None:
        return False
    try:
        recorded = json.loads((home / MIGRATED_MARK).read_text())
    except (OSError, ValueError):
        return False
    state = migrated_state(database)
    return state["revision"] is not None and recorded == state


class ServerStart:
    """A temporary server on its way up (:func:`begin_temporary_server`), holding the start lock
    until :meth:`ready` or :meth:`cancel`."""

    def __init__(self, server: TemporaryServer, lock: contextlib.ExitStack, home: Path,
                 database: Path | None = None) -> None:
        self.server, self._lock, self._home, self._database = server, lock, home, database

    def ready(self) -> TemporaryServer:
        """The server once it answers (:meth:`TemporaryServer.wait`); a start that migrated the
        database records its revision (:func:`skip_migrations`). Stopped when it fails."""
        try:
            self.server.wait()
            if self._database is not None and (state := migrated_state(self._database))["revision"] is not None:
                mark = self._home / MIGRATED_MARK
                tmp = mark.with_suffix(".tmp")
                tmp.write_text(json.dumps(state))
                tmp.replace(mark)
            return self.server
        except BaseException:
            self.server.stop()
            raise
        finally:
            self._lock.close()

    def cancel(self) -> None:
        """Stop the server, started or not (the run's checks failed); the start lock is released."""
        self.server.stop()
        self._lock.close()


def begin_temporary_server(migrated_only: bool = False) -> ServerStart | None:
    """Launch the run's temporary server (:class:`TemporaryServer`) and return at once, under the
    start lock of ``PREFECT_HOME`` (held until :meth:`ServerStart.ready`), after
    :func:`watch_for_orphans`; None when a server is configured (``PREFECT_API_URL``) or ephemeral
    servers are off, and with ``migrated_only`` when this start would migrate the database (a start
    that may be cancelled, launched before the run's checks have all passed, must not stop a
    migration halfway).

    Every run without ``PREFECT_API_URL`` has its own server on ``$PREFECT_HOME``'s database, whose
    start-up migrates that database and registers Prefect's block types; two runs starting together
    race there (the servers log IntegrityError tracebacks; two migrations of a new database can
    fail), hence the lock. A start that migrated records the database's revision; the next start
    skips the migration check while the database is still at it (:func:`skip_migrations`; Prefect
    skips the block types' registration the same way)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    watch_for_orphans()
    home = Path(PREFECT_HOME.value()).expanduser()
    lock = contextlib.ExitStack()
    lock.enter_context(_locked(home / ".temporary-server-start.lock"))
    try:
        database = sqlite_database()
        if skip_migrations(home, database):
            return ServerStart(TemporaryServer({"PREFECT_API_DATABASE_MIGRATE_ON_START": "false"}).launch(), lock, home)
        if migrated_only:
            lock.close()
            return None
        (home / MIGRATED_MARK).unlink(missing_ok=True)
        return ServerStart(TemporaryServer().launch(), lock, home, database)
    except BaseException:
        lock.close()
        raise


def start_temporary_server() -> TemporaryServer | None:
    """Start the run's temporary server and return it once it answers (:func:`begin_temporary_server`,
    :meth:`ServerStart.ready`); None when a server is configured or ephemeral servers are off. The
    flow uses it inside :func:`running_on`."""
    start = begin_temporary_server()
    return None if start is None else start.ready()


@contextlib.contextmanager
def running_on(server: TemporaryServer | None) -> Iterator[None]:
    """Flows run inside this against ``server`` (nothing changes for None: a configured server).
    ``PREFECT_API_URL`` names it, for this process (Prefect's settings) and for the processes it
    starts (Dask's workers report their task runs to it), until the block ends, and ``NO_PROXY``
    names 127.0.0.1 (a cluster's ``http_proxy`` would otherwise carry the run's own API calls); no UI address (the
    server serves none, and its "View at" links would be dead once the run ends). No flow-run
    heartbeats: they let a server mark a run Crashed when its process dies without a word, but this
    server dies with the process; and joining their thread costs up to 1 s at the end of each run
    (Prefect's heartbeat loop sleeps in 1 s steps)."""
    if server is None:
        yield
        return
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, PREFECT_UI_URL, temporary_settings

    # the server is on this host: Prefect's clients (httpx, which honours http_proxy / HTTP_PROXY)
    # must reach it directly, not through a proxy a cluster's environment may set
    variables = {"PREFECT_API_URL": server.api_url,
                 **{name: ",".join(filter(None, [os.environ.get(name, ""), "127.0.0.1"]))
                    for name in ("NO_PROXY", "no_proxy")}}
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url, PREFECT_UI_URL: "",
                                 PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
