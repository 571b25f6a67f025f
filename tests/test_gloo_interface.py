"""Where the main group is NCCL, the stop agreement's gloo group connects over the interface that reaches MASTER_ADDR
(what the main group's rendezvous reached), not over whatever the host name resolves to; one that cannot connect is
one line naming GLOO_SOCKET_IFNAME."""

import gc
import ipaddress
import json
import os
import subprocess
import sys
from datetime import timedelta

import psutil
import pytest
import torch.distributed as dist

from finetune.distributed.gloo_interface import interface_for_gloo, interface_reaching, new_gloo_group
import finetune.distributed.gloo_interface as gloo_interface
from finetune.errors import FinetuneError
from ports import free_port

TIMEOUT = timedelta(minutes=1)


def test_the_interface_reaching_an_address_is_the_one_that_holds_the_address_the_route_leaves_from():
    interfaces = psutil.net_if_addrs()
    name, address = interface_reaching("127.0.0.1", free_port())
    assert address == "127.0.0.1" and "127.0.0.1" in [a.address for a in interfaces[name]]
    # This machine's own address on another interface is reached from that interface (as the master reaches MASTER_ADDR).
    own = [(n, a.address) for n, addresses in interfaces.items() for a in addresses
           if a.family.name == "AF_INET" and not ipaddress.ip_address(a.address).is_loopback]  # fmt: skip
    for name, address in own:
        assert interface_reaching(address, 29500) == (name, address)
    assert interface_reaching("no-such-host.invalid", 29500) is None


@pytest.fixture(autouse=True)
def groups_collected_here():
    """A group that failed to connect leaves torch's objects in reference cycles (its traceback's frames): collected later in a
    process forked from this one (tests/test_class_images_processes' ranks, run after this file), they hung it in their destructor."""
    yield
    gc.collect()


@pytest.fixture
def nccl_launch(monkeypatch):
    """A process of a 2-process NCCL launch on one machine whose MASTER_ADDR is reached from eth7 (10.0.0.2)."""
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    reached = {"master-0": ("eth7", "10.0.0.2")}
    monkeypatch.setattr(gloo_interface, "interface_reaching", lambda host, port: reached.get(host))
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    for name, value in {"MASTER_ADDR": "master-0", "MASTER_PORT": "29500", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    return reached


def test_under_nccl_gloo_gets_the_interface_that_reaches_the_master(nccl_launch, monkeypatch):
    assert interface_for_gloo() == "eth7"
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "ib0")  # the user's choice stands
    assert interface_for_gloo() is None
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")  # a gloo main group connected with gloo's own choice
    assert interface_for_gloo() is None


def test_loopback_is_given_only_where_every_process_is_on_this_machine(nccl_launch, monkeypatch):
    nccl_launch["master-0"] = ("lo", "127.0.1.1")  # the master's host name, in its own /etc/hosts
    assert interface_for_gloo() == "lo"
    monkeypatch.setenv("WORLD_SIZE", "4")  # 2 machines of 2: the others cannot reach this machine's loopback
    own = [a.address for addresses in psutil.net_if_addrs().values() for a in addresses
           if a.family.name == "AF_INET" and not ipaddress.ip_address(a.address).is_loopback]  # fmt: skip
    for reachable in own[:1]:  # a host name gloo can bind to a network address of
        monkeypatch.setattr(gloo_interface.socket, "gethostname", lambda: reachable)
        assert interface_for_gloo() is None
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # a launcher that does not say how many processes run on this machine
    assert interface_for_gloo() is None
    nccl_launch["master-0"] = None  # MASTER_ADDR unreachable, or not known
    assert interface_for_gloo() is None


def test_a_group_that_could_only_bind_to_loopback_across_machines_is_one_line_before_any_wait(nccl_launch, monkeypatch):
    """Gloo's own choice is the host name's address, which resolves to loopback here: the other machines would try to connect to
    their own loopback, and gloo would wait out its 30 minutes."""
    nccl_launch["master-0"] = ("lo", "127.0.1.1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("GROUP_RANK", "1")  # the second machine
    monkeypatch.setattr(gloo_interface.socket, "gethostname", lambda: "localhost")
    with pytest.raises(FinetuneError, match=r"^the processes span several machines, and the host name of machine 1 \(localhost\) resolves to loopback only, "
                                            r".*MASTER_ADDR, master-0, leads to no other interface.*; export GLOO_SOCKET_IFNAME=<"):
        interface_for_gloo()
    nccl_launch["master-0"] = None  # nothing reaches MASTER_ADDR: gloo's own choice, loopback, would not do either
    with pytest.raises(FinetuneError, match="GLOO_SOCKET_IFNAME"):
        interface_for_gloo()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # one machine: loopback connects its processes
    assert interface_for_gloo() is None


def test_the_group_is_made_over_the_chosen_interface_and_the_environment_left_as_it_was(nccl_launch, monkeypatch):
    seen = []
    real_new_group = dist.new_group
    monkeypatch.setattr(dist, "new_group", lambda **kwargs: seen.append(os.environ.get("GLOO_SOCKET_IFNAME")) or real_new_group(**kwargs))
    loopback = interface_reaching("127.0.0.1", 29500)[0]
    nccl_launch["master-0"] = (loopback, "127.0.0.1")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # a world of one, in this process
    try:
        group = new_gloo_group(TIMEOUT)  # gloo binds to the named interface: it exists
        assert seen == [loopback] and "GLOO_SOCKET_IFNAME" not in os.environ
        dist.destroy_process_group(group)
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "")  # set empty, which gloo reads as unset: chosen for, and kept as set
        dist.destroy_process_group(new_gloo_group(TIMEOUT))
        assert seen[-1] == loopback and os.environ["GLOO_SOCKET_IFNAME"] == ""
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "nosuch0")
        with pytest.raises(FinetuneError, match=r"^the processes' gloo group .* could not connect over GLOO_SOCKET_IFNAME=nosuch0 \(.*nosuch0\): export GLOO_SOCKET_IFNAME="):
            new_gloo_group(TIMEOUT)
        assert os.environ["GLOO_SOCKET_IFNAME"] == "nosuch0"
    finally:
        dist.destroy_process_group()


def test_a_chosen_interface_that_cannot_connect_is_named_as_chosen_not_as_a_variable_the_user_set(nccl_launch, monkeypatch):
    """The user did not set GLOO_SOCKET_IFNAME: the line names the interface and why it was taken, then how to set one."""
    monkeypatch.setattr(gloo_interface, "interface_for_gloo", lambda: "nosuch0")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(FinetuneError, match=r"could not connect over nosuch0, the interface that reaches MASTER_ADDR \(master-0\) \(") as raised:
            new_gloo_group(TIMEOUT)
        assert "GLOO_SOCKET_IFNAME=nosuch0" not in str(raised.value) and "GLOO_SOCKET_IFNAME" not in os.environ
    finally:
        dist.destroy_process_group()


# Each of 2 processes under a main group that says it is NCCL: the stop agreement's group, made over the interface that
# reaches MASTER_ADDR (loopback here), agrees on a Ctrl-C that reached rank 1 alone.
UNDER_NCCL = r"""
import json, os, signal
from types import SimpleNamespace
import torch.distributed as dist
from finetune.distributed.stopping import StopRequest

dist.init_process_group("gloo")
dist.get_backend = lambda group=None: "nccl"
seen, real_new_group = [], dist.new_group
dist.new_group = lambda **kwargs: seen.append(os.environ.get("GLOO_SOCKET_IFNAME")) or real_new_group(**kwargs)
with StopRequest(SimpleNamespace(num_processes=2)).closed_at_the_end() as stop, stop:
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGINT)
    stopped = stop.agreed_now()
dist.destroy_process_group()
print(json.dumps({"interfaces": seen, "after": os.environ.get("GLOO_SOCKET_IFNAME"), "stopped": stopped}))
"""


def test_two_processes_under_nccl_agree_over_the_interface_that_reaches_the_master():
    port, loopback = str(free_port()), interface_reaching("127.0.0.1", 29500)[0]
    env = {key: value for key, value in os.environ.items() if key != "GLOO_SOCKET_IFNAME"}
    processes = [
        subprocess.Popen([sys.executable, "-c", UNDER_NCCL], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={
            **env, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": str(rank)})
        for rank in (0, 1)
    ]  # fmt: skip
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=600)  # a hang only (34 s on a busy host)
            assert process.returncode == 0, stderr[-3000:]
            assert json.loads(stdout.splitlines()[-1]) == {"interfaces": [loopback], "after": None, "stopped": True}
    finally:
        for process in processes:
            process.kill()


# Each of 2 processes on "machines" of their own under a main group that says it is NCCL: the second machine's host name
# resolves to loopback only, the first's does not (so its own check passes); each reports the line it ended with.
ONE_MACHINE_REFUSES = r"""
import json, os
from datetime import timedelta
import torch.distributed as dist
import finetune.distributed.gloo_interface as gloo_interface
from finetune.errors import FinetuneError

dist.init_process_group("gloo")
dist.get_backend = lambda group=None: "nccl"
if dist.get_rank() == 1:
    gloo_interface.socket.gethostname = lambda: "localhost"
else:
    gloo_interface._host_name_is_loopback = lambda: False
try:
    gloo_interface.new_gloo_group(timedelta(minutes=30))
    said = None
except FinetuneError as error:
    said = str(error)
print(json.dumps({"said": said}))
os._exit(0)  # (a group left half-made would wait for its peer at exit)
"""


def test_a_machine_whose_check_refuses_the_group_ends_every_machine_at_once_with_its_line():
    """The refusing machine said its line at once, but the other one, whose own check passed, went on to connect to it and
    waited out gloo's timeout (30 minutes) before a gloo traceback."""
    port = str(free_port())
    env = {key: value for key, value in os.environ.items() if key != "GLOO_SOCKET_IFNAME"}
    processes = [
        subprocess.Popen([sys.executable, "-c", ONE_MACHINE_REFUSES], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={
            **env, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
            "RANK": str(rank), "GROUP_RANK": str(rank)})
        for rank in (0, 1)
    ]  # fmt: skip
    try:
        said = []
        for process in processes:
            stdout, stderr = process.communicate(timeout=600)  # the first process would wait 30 minutes for the second
            assert process.returncode == 0, stderr[-3000:]
            said.append(json.loads(stdout.splitlines()[-1])["said"])
    finally:
        for process in processes:
            process.kill()
    assert said[0] == said[1] and said[0].startswith("the processes span several machines, and the host name of machine 1 (localhost) resolves to loopback only"), said
