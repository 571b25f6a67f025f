"""An error every process of a run meets, on two machines of two processes each: said once per machine, by its first process
(`finetune.distributed.error_exchange.says_its_error`). The first process of machine 0 kept the launch's store up only until its own machine's
other process had read its line: machine 1's other process, reading its own first's line later, found the store gone, took it
for "my first did not fail" and said the line again."""

import pytest
from train_stand_ins import outputs, start_processes

# Each of 4 processes ("machine" rank // 2, over loopback, started without torchrun's agent: rank 0's process hosts the store, as
# under DeepSpeed's multi-machine launcher) runs `finetune train`, whose run fails on every process with the same line.
EVERY_ONE_FAILS = r"""
import sys, time
from datetime import timedelta
import torch.distributed as dist
from train_stand_ins import run_train, stand_in_early_checks
import finetune.distributed.error_exchange
from finetune.errors import FinetuneError

finetune.distributed.error_exchange.READ_WAIT = timedelta(seconds=120)  # the test waits on the reads themselves, not on the clock
dist.init_process_group("gloo")
if dist.get_rank() == 3:  # machine 1, loaded: its other process reads its first's line once rank 0 has left (or 3 s on)
    import torch.distributed.distributed_c10d as c10d
    store = c10d._get_default_store()

    class SlowStore:
        def __getattr__(self, name):
            return getattr(store, name)

        def get(self, key):
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                try:
                    store.check([key])
                except RuntimeError:  # the store is gone with rank 0's process
                    break
                time.sleep(0.05)
            return store.get(key)

    c10d._get_default_store = SlowStore
stand_in_early_checks(output_dir=sys.argv[1])

def train(recipe, **options):
    dist.barrier()  # a collective's error: every process meets it
    raise FinetuneError("the weights hold NaN")

sys.exit(run_train(train))
"""


@pytest.mark.slow  # 4 processes (forks of this one since tests/train_stand_ins.py forks them: seconds; 20 to 60 s as interpreters)
def test_an_error_every_process_meets_is_said_once_per_machine(tmp_path):
    processes = start_processes(EVERY_ONE_FAILS, str(tmp_path), world_size=4, per_machine=2)
    results = outputs(processes)
    assert [process.returncode for process in processes] == [2, 2, 2, 2], results
    errors = [[line for line in stderr.splitlines() if line.startswith("error:")] for _, stderr in results]
    assert errors == [["error: machine 0: the weights hold NaN"], [], ["error: machine 1: the weights hold NaN"], []], results


# The same run's error, checked without launching: a store and a clock of the test's own, the launch's environment set by hand.
# Two machines of two processes: machine 0's other process reads its first's line 1 s after it was posted, machine 1's 5 s after.
READS_AT = (1.0, 5.0)


class Store:
    def __init__(self, now, lines):
        self.now, self.lines = now, lines

    def set(self, key, value):
        self.lines[key] = value.encode()

    def wait(self, keys, timeout):
        pass

    def get(self, key):
        return self.lines[key]

    def add(self, key, amount):  # any key: the old code counted each machine's reads under a key of its own
        return sum(self.now[0] >= at for at in READS_AT)


def launched(monkeypatch, rank: int, agent_store: bool):
    """This process as the 2-machine launch starts process `rank`, joined (to the test's store), on the test's clock: the clock."""
    from types import SimpleNamespace

    import torch

    import finetune.distributed.error_exchange as error_exchange

    now = [0.0]
    store = Store(now, {"finetune/error-of-machine/0": b"the weights hold NaN", "finetune/error-of-machine/1": b"the weights hold NaN"})
    monkeypatch.setattr(error_exchange, "time", SimpleNamespace(monotonic=lambda: now[0], sleep=lambda seconds: now.__setitem__(0, now[0] + seconds)))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)
    monkeypatch.setattr(torch.distributed.distributed_c10d, "_get_default_store", lambda: store)
    environment = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank % 2), "GROUP_RANK": str(rank // 2)}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    if agent_store:  # torchrun's agent of one machine hosts the store (accelerate launch)
        monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    else:  # rank 0's process hosts it
        monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    return error_exchange, now


def test_the_process_that_hosts_the_store_waits_for_every_machines_reader(monkeypatch):
    error_exchange, now = launched(monkeypatch, rank=0, agent_store=False)
    assert error_exchange.says_its_error("the weights hold NaN") is True
    assert now[0] == 0  # the line is said first: the wait comes after it
    error_exchange.wait_for_error_readers()
    assert READS_AT[1] <= now[0] < READS_AT[1] + 1  # machine 1's reader too (the old code left at 1 s, after machine 0's)


def test_under_the_agents_store_every_process_of_a_machine_waits_for_every_machines_reader(monkeypatch):
    """The agent hosting the store exits as soon as one of its machine's processes has failed: machine 0's other process
    leaving once it had read its own first's line took the store from machine 1's other process."""
    error_exchange, now = launched(monkeypatch, rank=1, agent_store=True)
    assert error_exchange.says_its_error("the weights hold NaN") is False  # its first said it
    error_exchange.wait_for_error_readers()
    assert READS_AT[1] <= now[0] < READS_AT[1] + 1


def test_a_stop_or_the_store_gone_ends_the_wait_and_the_line_is_still_said(monkeypatch):
    """The agent ends its machine's processes (SIGTERM: a stop) as the first of them exits, and its store with them: a first
    process still waiting said nothing (the stop's KeyboardInterrupt), and a reader must not take the store's loss after its
    read for "my first did not fail"."""
    for ending in (KeyboardInterrupt, RuntimeError):
        for rank, says in ((0, True), (1, False)):  # machine 0's first, and its other process (the same line: its first said it)
            error_exchange, now = launched(monkeypatch, rank=rank, agent_store=True)

            def stop(seconds, ending=ending):
                raise ending()

            monkeypatch.setattr(error_exchange.time, "sleep", stop)
            try:
                said = error_exchange.says_its_error("the weights hold NaN")
                error_exchange.wait_for_error_readers()
            except KeyboardInterrupt:  # (pytest would take it for the test run's own Ctrl-C)
                said = "raised the stop"
            assert said is says, (ending, rank)


def test_deepspeeds_launcher_tells_the_machines_apart_by_its_own_names(monkeypatch):
    """accelerate launch --use_deepspeed on several machines starts the processes with DeepSpeed's launcher (pdsh), which
    sets CROSS_RANK and LOCAL_SIZE, not torchrun's GROUP_RANK and LOCAL_WORLD_SIZE: every machine posted its line under
    machine 0's key, named itself machine 0, and rank 0, hosting the store, waited for no reader."""
    error_exchange, now = launched(monkeypatch, rank=0, agent_store=False)
    monkeypatch.delenv("GROUP_RANK")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("CROSS_RANK", "0")
    monkeypatch.setenv("LOCAL_SIZE", "2")
    assert error_exchange.says_its_error("the weights hold NaN") is True
    error_exchange.wait_for_error_readers()
    assert READS_AT[1] <= now[0] < READS_AT[1] + 1
    from finetune.distributed.process_env import machine_name

    monkeypatch.setenv("CROSS_RANK", "1")
    assert machine_name() == "machine 1"
