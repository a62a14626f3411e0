"""The public port's socket, for a single server and for the supervisor of workers."""

from __future__ import annotations

import socket

from .config import Settings


def bind(settings: Settings, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """The public socket (IPv4, or dual-stack for an IPv6 host).

    `listen=False` only holds the port (workers.py): a bound socket that
    does not listen receives no connections.
    """
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((settings.host, settings.port))
    if listen:
        sock.listen(4096)
        sock.setblocking(False)
    return sock
