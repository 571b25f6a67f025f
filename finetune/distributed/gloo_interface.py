"""The network interface of the processes' own gloo group (the stop agreement's, `finetune.distributed.stopping`) where the run's
main group is NCCL.

Left to itself gloo binds to the address this machine's host name resolves to (loopback where it resolves to none):
on clusters whose /etc/hosts maps the host name to 127.0.1.1 (Debian's and Ubuntu's default), or to a network the
machines do not share, the other machines cannot connect to it, and the group waits out its timeout (gloo's default
30 minutes; `finetune.distributed.stop_answers` gives it the main group's and 5 more) before failing in a gloo traceback. Under NCCL that group is the run's only gloo use, so nothing earlier met the
problem. The main group's rendezvous has already reached MASTER_ADDR: gloo is given the interface that reaches it,
as GLOO_SOCKET_IFNAME would, unless GLOO_SOCKET_IFNAME is set."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import socket
from datetime import timedelta

import psutil
import torch

from finetune.distributed.process_env import machine_name, processes_on_this_machine
from finetune.errors import FinetuneError

IFNAME = "GLOO_SOCKET_IFNAME"
ADVICE = f"export {IFNAME}=<the interface that reaches the other machines, as `ip addr` lists it> on each machine before accelerate launch"


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
    """The interface to give gloo's group, or None to leave gloo its own choice: where GLOO_SOCKET_IFNAME is set, where the
    main group is gloo (its choice connected already), and where the interface that reaches MASTER_ADDR, if any, would not
    do: loopback, unless every process is on this machine (torchrun names the master by its host name, which its own
    /etc/hosts may map to 127.0.1.1). Where the processes span machines and gloo's own choice is loopback too, the group
    could never connect: that is one line now, rather than gloo's wait of 30 minutes."""
    if os.environ.get(IFNAME) or "gloo" in str(torch.distributed.get_backend()).lower():
        return None
    host = os.environ.get("MASTER_ADDR")
    found = interface_reaching(host, int(os.environ.get("MASTER_PORT", "29500"))) if host else None
    machines = _machines()
    if found is not None and (not _loopback(found[1]) or machines == "one"):
        return found[0]
    if machines == "several" and _host_name_is_loopback():
        raise FinetuneError(
            f"the processes span several machines, and the host name of {machine_name() or 'this machine'} ({socket.gethostname()}) resolves to loopback only, where gloo "
            f"would bind the stop agreement's group (MASTER_ADDR, {host}, leads to no other interface): the other machines could not connect "
            f"to it; {ADVICE}"
        )
    return None


def new_gloo_group(timeout: timedelta) -> torch.distributed.ProcessGroup:
    """Collective: a gloo group of every process, over `interface_for_gloo()`'s interface, whose connection and operations
    each wait at most `timeout` for the other processes. One that cannot connect is one
    line naming GLOO_SOCKET_IFNAME, not gloo's traceback. A machine whose check refuses the group says so to every process
    first: the others would otherwise go on to connect to it, and wait out gloo's timeout."""
    try:
        chosen, refusal = interface_for_gloo(), ""
    except FinetuneError as error:
        chosen, refusal = None, str(error)
    refusal = next((said for said in _said_by_every_process(refusal) if said), "")
    if refusal:
        raise FinetuneError(refusal)
    with _ifname(chosen):
        try:
            return torch.distributed.new_group(backend="gloo", timeout=timeout)
        except RuntimeError as error:  # gloo's DistBackendError among them
            # Named as the user knows it: the variable only where they set it (ours is set for the call alone).
            if chosen is not None:
                over = f"over {chosen}, the interface that reaches MASTER_ADDR ({os.environ.get('MASTER_ADDR')})"
            elif os.environ.get(IFNAME):
                over = f"over {IFNAME}={os.environ[IFNAME]}"
            else:
                over = "over the address this machine's host name resolves to"
            raise FinetuneError(
                f"the processes' gloo group (it agrees on a Ctrl-C's stop) could not connect {over} ({str(error).strip().splitlines()[-1]}): {ADVICE}"
            ) from error


_checks = itertools.count()  # every process makes its groups in the same order: the n-th check's keys are the same everywhere


def _said_by_every_process(text: str) -> list[str]:
    """Collective: what each process says (by rank), exchanged in the rendezvous store the main group was made with, which
    every process has reached already (the main group may be NCCL, which holds no host memory; nothing here uses a device)."""
    store, rank, size = torch.distributed.distributed_c10d._get_default_store(), torch.distributed.get_rank(), torch.distributed.get_world_size()
    keys = [f"finetune/gloo-interface-check/{next(_checks)}/{other}" for other in range(size)]
    store.set(keys[rank], text)
    store.wait(keys)  # every process's answer: each one sets its key before anything that could wait on another
    said = [store.get(key).decode() for key in keys]
    store.set(f"{keys[rank]}/read", "")
    if rank == 0:  # without torchrun's agent the store lives in rank 0's process: it ends only once every process has read
        store.wait([f"{key}/read" for key in keys])
    return said


def _machines() -> str | None:
    """'one' where every process runs on this machine, 'several' where they do not, None where the launcher does not say
    (torchrun, under accelerate launch, and DeepSpeed's own launcher say; see process_env.processes_on_this_machine)."""
    here = processes_on_this_machine()
    if here is None:
        return None
    return "one" if here >= int(os.environ.get("WORLD_SIZE", "1")) else "several"


def _loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def _host_name_is_loopback() -> bool:
    """Whether gloo, left to itself, binds to loopback: the host name resolves to loopback addresses only, or to none."""
    try:
        addresses = {info[4][0].split("%")[0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        return True
    return all(_loopback(address) for address in addresses)


@contextlib.contextmanager
def _ifname(interface: str | None):
    """GLOO_SOCKET_IFNAME set to `interface` inside, where gloo reads it as a group is made, and as it was after (None:
    left as it is). Only while this group is made: the environment stays as the user set it (an empty value too)."""
    before = os.environ.get(IFNAME)
    if interface is not None:
        os.environ[IFNAME] = interface
    try:
        yield
    finally:
        if interface is not None:
            if before is None:
                del os.environ[IFNAME]
            else:
                os.environ[IFNAME] = before
