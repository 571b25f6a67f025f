"""Several processes agree on the step a Ctrl-C or SIGTERM stops them at, without a per-step wait: the flags'
sum is started at one step boundary (on a gloo group of the stop's own, in host memory) and read at the next,
so a stop is seen one step after the request, by every process at the same step. Two launched processes that
train and a stop that reaches one of them: tests/test_distributed.py."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import yaml

from ports import free_port

from finetune.distributed.stopping import StopRequest

# Each of 2 processes: the per-step agreements with a SIGTERM that reaches rank 1 alone before step 3's, the
# collectives they ran, then the agreement after the loop (waited for), and the process groups left after close().
AGREEING = r"""
import json, os, signal
from types import SimpleNamespace
import torch
import torch.distributed as dist
from finetune.distributed.stopping import StopRequest

def threads():  # this process's threads, gloo's among them (Linux; None elsewhere)
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None

dist.init_process_group("gloo")
dist.barrier()  # the default group's threads are up
rank, collectives, answers, threads_before = dist.get_rank(), [], [], threads()
real_all_reduce = dist.all_reduce

def all_reduce(tensor, *args, group=None, async_op=False, **kwargs):
    collectives.append({"async_op": async_op, "device": tensor.device.type, "own_gloo_group": group is not None and dist.get_backend(group) == "gloo"})
    return real_all_reduce(tensor, *args, group=group, async_op=async_op, **kwargs)

dist.all_reduce = all_reduce
accelerator = SimpleNamespace(num_processes=2, device=torch.device("cpu"))
with StopRequest(accelerator) as stop:
    for step in range(1, 7):
        if rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        answers.append(stop.agreed())
        if answers[-1]:
            break
per_step, stopped_by = list(collectives), stop.signal
stop.close()
with StopRequest(accelerator) as stop:  # the next run in this process: a request in its last step, after the loop
    stop.agreed()
    if rank == 0:
        os.kill(os.getpid(), signal.SIGINT)
    at_end, end_stopped_by = stop.agreed_now(), stop.signal
stop.close()
groups_left, threads_left = len(dist.distributed_c10d._world.pg_map), threads()
dist.destroy_process_group()
print(json.dumps({"answers": answers, "collectives": per_step, "at_end": at_end, "groups_left": groups_left,
                  "stopped_by": stopped_by, "end_stopped_by": end_stopped_by, "threads": [threads_before, threads_left]}))
"""


def test_a_stop_on_one_process_is_read_by_both_at_the_next_step_from_a_sum_that_never_waited_on_the_device():
    port = str(free_port())
    processes = [
        subprocess.Popen([sys.executable, "-c", AGREEING], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={
            **os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(rank)})
        for rank in (0, 1)
    ]  # fmt: skip
    reports = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=600)  # processes that disagreed would wait on each other until then
            assert process.returncode == 0, stderr[-3000:]
            reports.append(json.loads(stdout.splitlines()[-1]))
    finally:
        for process in processes:
            process.kill()  # (done already unless the test failed)
    for report in reports:
        # Asked before step 3's agreement (rank 1 only): step 3 reads step 2's sum, step 4 reads step 3's.
        assert report["answers"] == [False, False, False, True], report
        # Each step started a sum (none after the stop) on the host, in the stop's own gloo group, without waiting for it:
        # a GPU's queue is never drained for it, whatever the main backend.
        assert report["collectives"] == [{"async_op": True, "device": "cpu", "own_gloo_group": True}] * 3, report
        assert report["at_end"] is True  # after the loop the answer is waited for: a request in the last step counts
        # Each process stops as the one that was sent the signal: it exits 143 for SIGTERM (not Ctrl-C's 130), 130 for SIGINT.
        assert (report["stopped_by"], report["end_stopped_by"]) == (signal.SIGTERM, signal.SIGINT), report
        assert report["groups_left"] == 1  # the default one: each run's stop group is closed
        # ... and gone, its gloo threads (two run loops and a socket loop) ended with it. destroy_process_group only makes torch forget
        # a group: it and its threads live on while anything holds it, into the interpreter's exit, where a gloo thread that drops the
        # last hold on a tensor made in Python needs the GIL and aborts the process (torch's issue 190489: "terminate called without an
        # active exception"). The default group's threads do live on: DistributedDataParallel holds it after destroy_process_group.
        assert report["threads"][0] == report["threads"][1], report


def test_one_process_stops_at_the_requested_step_without_collectives():
    with StopRequest(SimpleNamespace(num_processes=1)) as stop:  # no process group exists: a collective would fail
        assert not stop.agreed()
        os.kill(os.getpid(), signal.SIGINT)  # handled at once, in this thread
        assert stop.agreed() and stop.agreed_now()
    stop.close()



def test_a_run_that_fails_closes_its_stop_agreement_without_waiting_for_a_sum():
    """The stop agreement's gloo group was closed only at a run's normal end: a train() that failed left it behind, in
    a process that trains again (as groups_left above counts). After an error it is closed without waiting for the sum
    left running, which a process that failed mid-step would never join."""
    import torch.distributed as dist

    class NeverJoined:
        def wait(self):
            raise AssertionError("waited for a sum after an error")

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # a world of one, in this process
    try:
        with pytest.raises(ValueError, match="^failed mid-step$"):
            with StopRequest(SimpleNamespace(num_processes=2)).closed_at_the_end() as stop, stop:
                stop._pending = (NeverJoined(), None)
                raise ValueError("failed mid-step")
        assert len(dist.distributed_c10d._world.pg_map) == 1  # the default group alone: the stop's is closed
        with StopRequest(SimpleNamespace(num_processes=2)).closed_at_the_end() as stop, stop:  # at a normal end, the last sum is read
            assert not stop.agreed()
        assert len(dist.distributed_c10d._world.pg_map) == 1
    finally:
        dist.destroy_process_group()


# `finetune train` as the command line runs it, reporting how many process groups are left when the program closes them.
TRAIN_COMMAND = r"""
import sys
import torch.distributed as dist
from finetune.cli.main import main
import finetune.distributed.processes

leave_process_group = finetune.distributed.processes.leave_process_group

def leave():
    print(f"groups left: {len(dist.distributed_c10d._world.pg_map)}")
    leave_process_group()

finetune.distributed.processes.leave_process_group = leave
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # two interpreters that load torch, diffusers and the model: 30 s to a minute on 2 cores
def test_two_processes_whose_run_fails_after_the_stop_agreement_exists_close_it_and_exit_with_the_one_line_error(make_recipe, tmp_path):
    """Both processes find the weights turned NaN at step 1's checkpoint (a learning rate of 1e38), right after that step
    started its sum of stop flags: each closes the stop agreement's group, says nothing of gloo, and exits 2 at once,
    rank 0 with the error line (the processes started as `accelerate launch` starts them, without its launcher, whose
    agent would kill the second process as soon as the first one exited)."""
    recipe = tmp_path / "diverging.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(train__batch_size=1, optimizer__lr=1e38, checkpoint__every_n_steps=1).model_dump(mode="json")))
    port = str(free_port())
    processes = [
        subprocess.Popen([sys.executable, "-c", TRAIN_COMMAND, "train", str(recipe)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={
            **os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
            "RANK": str(rank), "LOCAL_RANK": str(rank)})
        for rank in (0, 1)
    ]  # fmt: skip
    outputs, ended = [], []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=300))
            ended.append(time.monotonic())
    finally:
        for process in processes:
            process.kill()  # (done already unless the test failed)
    assert ended[1] - ended[0] < 30  # the second process did not wait on a sum the first one had left
    for rank, (process, (stdout, stderr)) in enumerate(zip(processes, outputs)):
        assert process.returncode == 2, stderr[-3000:]
        assert "groups left: 1" in stdout  # the default group alone: the stop agreement's was closed by train() itself
        assert not re.search("Traceback|gloo|ProcessGroup", stderr, re.IGNORECASE), stderr[-3000:]
        errors = [line for line in stderr.splitlines() if "error:" in line]
        if rank == 0:  # said once, by the machine's first process
            assert len(errors) == 1 and "NaN or infinite values at step 1 " in errors[0], stderr[-3000:]
        else:
            assert errors == [], stderr[-3000:]
