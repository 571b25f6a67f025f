"""A free TCP port on loopback, for tests that launch several processes (each launch its own port)."""

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
