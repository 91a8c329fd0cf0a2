"""TCP sockets that notice a dead path: keepalives find one on an idle connection in about
11 s, and ``TCP_USER_TIMEOUT`` fails a write whose bytes go unacknowledged for longer than a
call may take (a black-holed database or aggregator is down within its deadline)."""

from __future__ import annotations

import contextlib
import socket


def tune_socket(sock: socket.socket | None, user_timeout: float) -> None:
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3),
                        ("TCP_USER_TIMEOUT", int(user_timeout * 1000))):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    for level, option, value in options:
        with contextlib.suppress(OSError):
            sock.setsockopt(level, option, value)
