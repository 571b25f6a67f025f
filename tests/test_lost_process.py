"""A process of a run killed (SIGKILL, the out-of-memory killer): the others' next collective failed in gloo's traceback
("Connection closed by peer ... GLHF!"), which named neither the cause nor what to do. It is one line now."""

import pytest
import torch
from train_stand_ins import outputs, start_processes

from finetune.distributed.error_exchange import lost_process_said
from finetune.errors import FinetuneError

# 2 processes of one machine run `finetune train`; process 0 is killed in its run, process 1's run meets it in a collective.
ONE_KILLED = r"""
import os, signal, sys, time
import torch, torch.distributed as dist
from train_stand_ins import run_train, stand_in_early_checks
import finetune.distributed.processes  # (accelerate: seconds) before the processes join, as the run's errors meet them after it

dist.init_process_group("gloo")
# Rank 0's process hosts the store (no torchrun agent here): killed while process 1 was still in its group's setup, it
# failed there, in the store's "Connection reset by peer", before any run (seen once on a loaded CI machine).
dist.barrier()
stand_in_early_checks(output_dir=sys.argv[1])

def train(recipe, **options):
    if dist.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(1)
    dist.all_reduce(torch.ones(4))  # a step's gradients

sys.exit(run_train(train))
"""


def test_the_process_left_when_another_is_killed_says_one_line(tmp_path):
    processes = start_processes(ONE_KILLED, str(tmp_path / "run"), world_size=2, per_machine=2)
    said = outputs(processes)
    assert [process.returncode for process in processes] == [-9, 2], said
    stderr = said[1][1]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert errors[0].startswith("error: another process of the run ended, or its machine went down (gloo: Connection closed by peer"), stderr
    assert errors[0].endswith(f"this one stops too: continue with --resume latest (the last checkpoint in {tmp_path / 'run' / 'checkpoints'} is kept)")


# Under NCCL (GPUs) a process gone fails the others' collectives with NCCL's texts, as torch words them (its NCCLUtils.cpp and
# ProcessGroupNCCL.cpp; the first as a run on two machines logged it when one was lost).
NCCL_REMOTE = ("NCCL error in: /pytorch/torch/csrc/distributed/c10d/NCCLUtils.cpp:77, remote process exited or there was a network "
               "error, NCCL version 2.26.2\nncclRemoteError: A call failed possibly due to a network error or a remote process exiting "
               "prematurely.\nLast error:\nsocketProgress: Connection closed by remote peer gpu-node-2<36812>")  # fmt: skip
NCCL_ABORTED = ("NCCL communicator was aborted on rank 1.  Original reason for failure was: NCCL error: remote process exited or there "
                "was a network error, NCCL version 2.21.5\nncclRemoteError: A call failed possibly due to a network error or a remote "
                "process exiting prematurely.")  # fmt: skip
NCCL_WATCHDOG = ("NCCL communicator was aborted on rank 0.  Original reason for failure was: [Rank 0] Watchdog caught collective operation "
                 "timeout: WorkNCCL(SeqNum=412, OpType=ALLREDUCE, NumelIn=797184, NumelOut=797184, Timeout(ms)=600000) ran for 600081 "
                 "milliseconds before timing out.")  # fmt: skip
NCCL_OTHER = ("NCCL error in: /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1970, invalid usage (run with NCCL_DEBUG=WARN for "
              "details), NCCL version 2.21.5\nncclInvalidUsage: This usually reflects invalid usage of NCCL library.")  # fmt: skip
GONE = "another process of the run ended, or its machine went down"


@pytest.fixture
def nccl_group_of_two(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")


@pytest.mark.parametrize("text, said", [
    (NCCL_REMOTE, f"{GONE} (NCCL: remote process exited or there was a network error)"),
    (NCCL_ABORTED, f"{GONE} (NCCL: remote process exited or there was a network error)"),
    (NCCL_WATCHDOG, "another process of the run ended or stopped answering (hung, or its machine went down): NCCL's watchdog ended a collective that waited for it 600 s"),
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection reset by peer", f"{GONE} (nccl: Connection reset by peer)"),  # the launch's store
])  # fmt: skip
def test_a_process_lost_under_nccl_is_one_line_too(nccl_group_of_two, tmp_path, text, said):
    """error_exchange read a lost process from gloo's messages only: under NCCL the survivors' traceback stayed."""
    with pytest.raises(FinetuneError) as raised, lost_process_said(str(tmp_path / "run")):
        raise torch.distributed.DistBackendError(text)
    assert str(raised.value) == f"{said}: its own log says why; this one stops too: continue with --resume latest (the last checkpoint in {tmp_path / 'run' / 'checkpoints'} is kept)"


@pytest.mark.parametrize("text", [
    NCCL_OTHER, "CUDA out of memory. Tried to allocate 2.00 GiB",
    "Data processing error: CAS service error : Reqwest Error: error sending request: Connection reset by peer (os error 104)",
])  # fmt: skip
def test_other_nccl_cuda_and_download_errors_are_raised_as_they_are(nccl_group_of_two, tmp_path, text):
    """A download's reset connection (hf_xet raises RuntimeError) is no process of the run lost: it has no gloo source location."""
    with pytest.raises(RuntimeError, match="invalid usage|out of memory|Reqwest"), lost_process_said(str(tmp_path)):
        raise RuntimeError(text)
