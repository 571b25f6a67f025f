"""The stop agreement waits for the other processes as long as the main group's timeout and 5 minutes more (a process
further behind would have failed the main group first), not gloo's own 30 minutes; when that runs out, or a process
leaves, the line names the processes that did not answer, said once per machine by a process that did."""

import json
import os
import subprocess
import sys
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist

from ports import free_port

from finetune.distributed.stop_answers import Answers, agreement_timeout, main_group_timeout
from finetune.distributed.stopping import StopRequest

TIMED_OUT = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 900000ms for recv operation to complete")


def test_the_agreements_group_waits_the_main_groups_timeout_and_five_minutes_more():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=42))
    try:
        assert main_group_timeout() == timedelta(seconds=42) and agreement_timeout() == timedelta(minutes=5, seconds=42)
        with StopRequest(SimpleNamespace(num_processes=2)).closed_at_the_end() as stop, stop:
            assert stop._group._get_backend(torch.device("cpu")).options._timeout == timedelta(minutes=5, seconds=42)  # was gloo's 30 minutes
            assert not stop.agreed()
    finally:
        dist.destroy_process_group()


def answers_of(counts: list[int], rank: int) -> Answers:
    """Rank `rank`'s record, where each process (by rank) has started counts[rank] sums."""
    store = dist.HashStore()
    for other, count in enumerate(counts):
        if count:  # a process that never started one has no key
            store.set(f"agreement/{other}", str(count))
    answers = Answers(store, "agreement/", rank, len(counts), timedelta(minutes=15))
    answers.started = counts[rank]
    return answers


def test_the_line_names_the_processes_that_did_not_start_the_sum_that_timed_out(monkeypatch):
    for name, value in {"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)  # two machines of two processes
    problem = answers_of([3, 3, 2, 0], rank=0).failure(TIMED_OUT)
    assert str(problem).startswith(
        "processes 2, 3 (of 4) did not answer the stop agreement in 15 minutes (the main process group's timeout and 5 minutes more): "
        "they are hung, or gone with a machine (gloo: Timed out waiting 900000ms for recv operation to complete); their own logs say where they stopped"
    ), problem
    assert str(problem).endswith("then continue with --resume latest") and "\n" not in str(problem)
    assert problem.said_here  # the first process of its machine
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not answers_of([3, 3, 2, 0], rank=1).failure(TIMED_OUT).said_here  # rank 0 says it for this machine
    one = answers_of([1, 2, 2, 2], rank=1).failure(TIMED_OUT)  # rank 0 is the one that did not answer: its machine's next one says it
    assert str(one).startswith("process 0 (of 4) did not answer the stop agreement in 15 minutes") and one.said_here


def test_a_process_that_left_after_answering_and_a_store_that_does_not_answer_are_lines_too(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    lost = answers_of([2, 2], rank=0).failure(RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.3]:43406. This is typically caused by a remote worker crashing. GLHF!"))
    assert str(lost).startswith("the stop agreement lost another process (gloo: Connection closed by peer [10.0.0.3]:43406): it ended"), lost
    assert lost.said_here

    class Unreachable(dist.HashStore):
        def check(self, keys):
            raise dist.DistStoreError("Socket Timeout")

    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    answers = Answers(Unreachable(), "agreement/", 1, 2, timedelta(minutes=15))
    answers.start()
    silent = answers.failure(TIMED_OUT)
    assert "nor did the rendezvous store on the main machine (10.0.0.1): that machine may be down" in str(silent) and silent.said_here
    assert answers.store.timeout == timedelta(minutes=5)  # its own timeout again: the main group still uses it (a HashStore's is 5 minutes)


# Each of 2 processes: rank 1 hangs after the first step's agreement; rank 0 agrees at two more step boundaries and reports
# the line it ended with, and after how long. The main group's timeout is 3 s here, and the margin none.
ONE_HANGS = r"""
import json, os, time
from datetime import timedelta
from types import SimpleNamespace
import torch.distributed as dist
import finetune.distributed.stop_answers as stop_answers
from finetune.distributed.stopping import StopRequest
from finetune.errors import FinetuneError

dist.init_process_group("gloo")
stop_answers.main_group_timeout, stop_answers.MARGIN = (lambda: timedelta(seconds=3)), timedelta(0)
with StopRequest(SimpleNamespace(num_processes=2)).closed_at_the_end() as stop, stop:
    stop.agreed()
    if dist.get_rank() == 1:
        time.sleep(600)
    started = time.monotonic()
    try:
        for step in (2, 3):
            stop.agreed()
        said = None
    except FinetuneError as error:
        said = {"line": str(error), "said_here": error.said_here}
print(json.dumps({"said": said, "after": time.monotonic() - started}))
os._exit(0)
"""


def test_a_process_that_hangs_ends_the_other_after_the_timeout_with_a_line_naming_it():
    port = str(free_port())
    processes = [
        subprocess.Popen([sys.executable, "-c", ONE_HANGS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={
            **os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)})
        for rank in (0, 1)
    ]  # fmt: skip
    try:
        stdout, stderr = processes[0].communicate(timeout=600)  # gloo's own timeout would wait 30 minutes
        assert processes[0].returncode == 0, stderr[-3000:]
        report = json.loads(stdout.splitlines()[-1])
    finally:
        for process in processes:
            process.kill()
    assert report["said"]["said_here"] and report["said"]["line"].startswith(
        "process 1 (of 2) did not answer the stop agreement in 3 s (the main process group's timeout and 0 minutes more): it is hung"
    ), report
    assert 2 < report["after"] < 60, report


def test_the_first_process_of_a_machine_is_not_always_the_one_that_says_a_line(tmp_path, capsys, monkeypatch):
    """cli said every error from local rank 0 alone, which may be the process that did not answer."""
    import finetune.cli.main as cli
    from finetune.errors import FinetuneError

    def fails(args):
        problem = FinetuneError("process 0 (of 2) did not answer the stop agreement")
        problem.said_here = os.environ["LOCAL_RANK"] == "1"
        raise problem

    monkeypatch.setitem(cli.COMMANDS, "train", fails)
    for local_rank, lines in (("0", 0), ("1", 1)):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert cli.main(["train", str(tmp_path / "recipe.yaml")]) == 2
        assert len(capsys.readouterr().err.splitlines()) == lines, local_rank
