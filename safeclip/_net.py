"""Network reachability, asked in seconds: whether a host accepts a TCP connection, and the offline switches.

Used before a download (hub weights, pinned artifacts) so that a machine without a network fails at once with a
useful message instead of in a minute of retries.
"""

from __future__ import annotations

import os
import socket
import threading

__all__ = ["can_connect", "env_true"]


def env_true(name: str) -> bool:
    """Whether the environment variable ``name`` is set to 1, true, yes or on (any case)."""
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def can_connect(host: str, port: int, timeout: float) -> bool:
    """A TCP connection within ``timeout``; run in a thread because name resolution itself has no timeout."""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, name="safeclip-net-probe", daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])
