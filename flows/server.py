"""``make server``: ``prefect server start``, but never unauthenticated on a network address.

Prefect's server has no authentication unless ``PREFECT_SERVER_API_AUTH_STRING`` is set; then
every API request and websocket needs the same string (clients set ``PREFECT_API_AUTH_STRING``).
On a loopback address only this machine reaches the server, so the string is optional; on any
other address (``0.0.0.0``, a LAN address, a host name) anyone who reaches the port could read
every run and start any deployment, so this refuses to start without the string, in one line.
docs/deployment.md ("Other hosts") shows the setup and what the string does not protect.

    python flows/server.py [--host HOST] [--port PORT] [other `prefect server start` options]
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys

EXIT_USAGE = 2  # as flows/cli.py: invalid arguments or settings


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and the loopback addresses (127.0.0.0/8, ``::1``), which only this
    machine can connect to."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve to a network address
        return False


def server_auth_string() -> str | None:
    """The server's auth string as Prefect will read it (environment, profile, .env or
    prefect.toml), or None when it is unset or empty."""
    if os.environ.get("PREFECT_SERVER_API_AUTH_STRING", "").strip():  # saves importing prefect (3 s)
        return os.environ["PREFECT_SERVER_API_AUTH_STRING"]
    from prefect.settings import get_current_settings

    secret = get_current_settings().server.api.auth_string
    value = secret.get_secret_value() if secret is not None else ""
    return value if value.strip() else None


def default_host() -> str:
    from prefect.settings import get_current_settings

    return get_current_settings().server.api.host


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Start the Prefect server; on a non-loopback address only with "
                    "PREFECT_SERVER_API_AUTH_STRING set. Other options go to `prefect server start`.")
    parser.add_argument("--host", help="address to listen on (default: PREFECT_SERVER_API_HOST, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: PREFECT_SERVER_API_PORT, 4200)")
    args, rest = parser.parse_known_args(argv)
    host = args.host or default_host()
    if not is_loopback(host) and server_auth_string() is None:
        print(f"error: refusing to serve the Prefect API on {host} without authentication: set "
              f"PREFECT_SERVER_API_AUTH_STRING='user:password' for the server and PREFECT_API_AUTH_STRING "
              f"to the same on every client, or listen on 127.0.0.1 (docs/deployment.md)", file=sys.stderr)
        return EXIT_USAGE
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", host]
    if args.port is not None:
        command += ["--port", str(args.port)]
    # exec, not a child: Ctrl-C and a supervisor's signals reach the server itself, and no
    # wrapper process is left to outlive it
    os.execv(sys.executable, command + rest)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
