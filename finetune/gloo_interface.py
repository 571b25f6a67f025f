"""The network interface of the processes' own gloo group (the stop agreement's, `finetune.stopping`) where the run's
main group is NCCL.

Left to itself gloo binds to the address this machine's host name resolves to (loopback where it resolves to none):
on clusters whose /etc/hosts maps the host name to 127.0.1.1 (Debian's and Ubuntu's default), or to a network the
machines do not share, the other machines cannot connect to it, and the group waits out its timeout (30 minutes)
before failing in a gloo traceback. Under NCCL that group is the run's only gloo use, so nothing earlier met the
problem. The main group's rendezvous has already reached MASTER_ADDR: gloo is given the interface that reaches it,
as GLOO_SOCKET_IFNAME would, unless GLOO_SOCKET_IFNAME is set."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket

import psutil
import torch

from finetune.errors import FinetuneError
from finetune.process_env import machine_name

IFNAME = "GLOO_SOCKET_IFNAME"


def interface_reaching(host: str, port: int) -> tuple[str, str] | None:
    """(name, address) of the interface this machine reaches host:port from; None where the host does not resolve,
    no route leads to it, or no interface holds the address the route leaves from."""
    try:
        family, _, _, _, destination = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(destination)  # a UDP connect picks the route and its source address, and sends nothing
            local = probe.getsockname()[0].split("%")[0]  # an IPv6 address's scope aside
    except OSError:
        return None
    for name, addresses in psutil.net_if_addrs().items():
        if any(address.address.split("%")[0] == local for address in addresses):
            return name, local
    return None


def interface_for_gloo() -> str | None:
    """The interface to give gloo's group, or None to leave gloo its own choice: where GLOO_SOCKET_IFNAME is set, where
    the main group is gloo (its choice connected already), where no MASTER_ADDR says where the others are, and where
    MASTER_ADDR is reached over loopback while the processes span several machines (the master's host name read in its
    own /etc/hosts: the other machines cannot reach that address)."""
    if os.environ.get(IFNAME) or "gloo" in str(torch.distributed.get_backend()).lower():
        return None
    host = os.environ.get("MASTER_ADDR")
    found = interface_reaching(host, int(os.environ.get("MASTER_PORT", "29500"))) if host else None
    if found is None:
        return None
    name, address = found
    if ipaddress.ip_address(address).is_loopback and machine_name() is not None:
        return None
    return name


def new_gloo_group() -> torch.distributed.ProcessGroup:
    """Collective: a gloo group of every process, over `interface_for_gloo()`'s interface. One that cannot connect is one
    line naming GLOO_SOCKET_IFNAME, not gloo's traceback."""
    with _ifname(interface_for_gloo()):
        try:
            return torch.distributed.new_group(backend="gloo")
        except RuntimeError as error:  # gloo's DistBackendError among them
            over = f"over {IFNAME}={os.environ[IFNAME]}" if os.environ.get(IFNAME) else "over the address this machine's host name resolves to"
            raise FinetuneError(
                f"the processes' gloo group (it agrees on a Ctrl-C's stop) could not connect {over} ({str(error).strip().splitlines()[-1]}): "
                f"export {IFNAME}=<the interface that reaches the other machines, as `ip addr` lists it> on each machine before accelerate launch"
            ) from error


@contextlib.contextmanager
def _ifname(interface: str | None):
    """GLOO_SOCKET_IFNAME set to `interface` inside, where gloo reads it as a group is made, and unset again after (None:
    left as it is). Only while this group is made: the environment stays as the user set it."""
    if interface is not None:
        os.environ[IFNAME] = interface
    try:
        yield
    finally:
        if interface is not None:
            del os.environ[IFNAME]
