"""accelerate launch --use_deepspeed on several machines starts the processes with DeepSpeed's own launcher (pdsh), which
says how many processes run on each machine as LOCAL_SIZE, not torchrun's LOCAL_WORLD_SIZE: the data check's threads,
the stop agreement's line and gloo's interface count the processes of this machine under either name."""

from datetime import timedelta

import pytest
import torch.distributed as dist

from finetune.data_check import threads as check_threads
import finetune.distributed.gloo_interface as gloo_interface
from finetune.distributed.stop_answers import Answers
from finetune.errors import FinetuneError

TIMED_OUT = RuntimeError("Timed out waiting 900000ms for recv operation to complete")


@pytest.fixture
def deepspeeds_launch(monkeypatch):
    """The environment DeepSpeed's launcher (deepspeed/launcher/launch.py) gives a process of 2 machines of 2 processes."""
    for name in ("LOCAL_WORLD_SIZE", "GROUP_RANK", "FINETUNE_CHECK_THREADS", "GLOO_SOCKET_IFNAME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"WORLD_SIZE": "4", "LOCAL_SIZE": "2", "CROSS_RANK": "1", "CROSS_SIZE": "2", "MASTER_ADDR": "master-0"}.items():
        monkeypatch.setenv(name, value)


def test_the_processes_of_a_machine_share_its_cpus(deepspeeds_launch, monkeypatch):
    monkeypatch.setattr(check_threads.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert check_threads.check_threads() == 4  # 8 CPUs for 2 processes (was 8 each: one process per machine)


def test_the_stop_agreements_line_is_said_by_the_first_process_of_the_machine_that_answered(deepspeeds_launch, monkeypatch):
    store = dist.HashStore()
    for rank in (0, 1, 3):  # rank 2, the second machine's first, never answered
        store.set(f"agreement/{rank}", "1")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    answers = Answers(store, "agreement/", 3, 4, timedelta(minutes=15))
    answers.started = 1
    problem = answers.failure(TIMED_OUT)
    assert str(problem).startswith("process 2 (of 4) did not answer the stop agreement") and problem.said_here


def test_gloo_is_not_given_loopback_across_machines_and_is_on_one(deepspeeds_launch, monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(gloo_interface, "interface_reaching", lambda host, port: ("lo", "127.0.1.1"))
    monkeypatch.setattr(gloo_interface.socket, "gethostname", lambda: "localhost")
    with pytest.raises(FinetuneError, match=r"^the processes span several machines, and the host name of machine 1 \(localhost\) resolves to loopback only"):
        gloo_interface.interface_for_gloo()
    monkeypatch.setenv("WORLD_SIZE", "2")  # one machine of 2 processes: loopback connects them
    assert gloo_interface.interface_for_gloo() == "lo"
