"""Fail early, in one line, when a port Vigil needs is taken, naming the variable that moves it."""

from __future__ import annotations

import socket
from collections.abc import Sequence


class PortInUse(SystemExit):
    pass


def check_free(host: str, ports: Sequence[tuple[str, int, int]]) -> None:
    """`ports` holds (variable, port, socket type); raises PortInUse with a one-line message."""
    for var, port, kind in ports:
        with socket.socket(socket.AF_INET, kind) as s:
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                proto = "tcp" if kind == socket.SOCK_STREAM else "udp"
                msg = f"vigil: {host}:{port}/{proto} is not available ({exc.strerror}); set {var} to move it"
                raise PortInUse(msg) from None
