"""Network reachability, asked in seconds: whether a host accepts a TCP connection, and the offline switches.

Used before a download (hub weights, pinned artifacts) so that a machine without a network fails at once with a
useful message instead of in a minute of retries.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading

__all__ = ["can_connect", "env_true", "non_public_kind", "resolve"]


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


def resolve(host: str, port: int, timeout: float) -> list[str] | None:
    """The addresses ``host`` resolves to, or None when it does not resolve within ``timeout`` (run in a thread for
    the same reason as :func:`can_connect`)."""
    result: list[list[str]] = []

    def lookup() -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            result.append([str(info[4][0]) for info in infos])
        except (OSError, UnicodeError):
            pass

    t = threading.Thread(target=lookup, name="safeclip-net-resolve", daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result and result[0] else None


def non_public_kind(address: str) -> str | None:
    """What kind of non-public address ``address`` is (``"loopback"``, ``"private"``, ``"link-local"``,
    ``"multicast"``, ``"reserved"``, ``"unspecified"``, ``"non-global"``), or None for a public one.

    >>> non_public_kind("127.0.0.1"), non_public_kind("::ffff:10.0.0.1"), non_public_kind("93.184.215.14")
    ('loopback', 'private', None)
    """
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "unparseable"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind, hit in (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
                      ("link-local", ip.is_link_local), ("multicast", ip.is_multicast), ("private", ip.is_private),
                      ("reserved", ip.is_reserved)):
        if hit:
            return kind
    return None if ip.is_global else "non-global"
