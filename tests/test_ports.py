"""tests/ports.py: a launch's port is one no other socket is handed in the meantime."""

import socket

from ports import ephemeral_start, free_port, worker_stretch


def test_a_free_port_is_below_the_range_the_kernel_hands_out_and_skips_one_in_use():
    first = free_port()
    assert first < ephemeral_start() and first in worker_stretch()  # bind(("", 0)) and connect() never take it
    with socket.socket() as held:
        held.bind(("127.0.0.1", first + 1 if first + 1 in worker_stretch() else worker_stretch().start))
        held.listen()
        taken = held.getsockname()[1]
        ports = [free_port() for _ in range(len(worker_stretch()) // 1000 + 3)]
    assert taken not in ports and first not in ports and len(set(ports)) == len(ports)
