"""The tests' one free-port helper (standard library only, so any test helper can import it)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now, chosen by the OS.

    The port is released before it is returned, so another process could take it first;
    the tests accept that small race rather than hand a bound socket to a child process.
    """
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
