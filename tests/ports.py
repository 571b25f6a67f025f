"""A free TCP port on loopback, for tests that launch several processes (each launch its own port).

The port is one the kernel never hands out by itself: below its ephemeral range. A port found free by binding port 0
comes from that range, and between that moment and the launch binding it (seconds later: an interpreter starts, torch
imports) any socket asking for port 0 could get it, a gloo connection or store of the other pytest worker's launch among
them, and the launch failed with "address already in use". Below the range only an explicit bind takes a port: each
pytest worker walks a stretch of its own (from a random place, for other test runs on the machine), skipping ports
something holds."""

import os
import random
import socket
from pathlib import Path

LOWEST = 10_000  # below: ports that services are commonly configured on
LINUX_EPHEMERAL_START = 32_768  # where /proc does not say (macOS' range starts higher, at 49152)


def ephemeral_start() -> int:
    """The first port of the range the kernel picks from for port 0 and outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return LINUX_EPHEMERAL_START


def worker_stretch() -> range:
    """This pytest-xdist worker's share of the ports below the ephemeral range (all of them without xdist)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    size = (ephemeral_start() - LOWEST) // workers
    return range(LOWEST + worker * size, LOWEST + (worker + 1) * size)


_position = None  # where this process goes on in its stretch: never the same port twice in a row


def free_port() -> int:
    global _position
    stretch = worker_stretch()
    if not stretch:  # a machine whose ephemeral range starts low: the kernel's own choice, as before
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    if _position is None:
        _position = random.randrange(len(stretch))
    for _ in range(len(stretch)):
        port = stretch[_position % len(stretch)]
        _position += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))  # no SO_REUSEADDR: a port still in TIME_WAIT after an earlier launch is skipped too
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port from {stretch.start} to {stretch.stop - 1}")
