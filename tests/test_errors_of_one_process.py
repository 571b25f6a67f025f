"""An error of the run that one process meets alone (a file or a write of its own) is said, by that process; one that every
process meets (a collective check) is said once per machine, by its first process. Said by each machine's first process
alone (local rank 0), process 1's own error was said by no one while process 0 waited for it in the run."""

from train_stand_ins import outputs, start_processes

# Each of 2 processes of one machine runs `finetune train` whose run fails on process 1 alone (argument "alone": process 0's run
# waits, then ends as a stopped run would; the launcher would kill it) or on both with the same line ("both").
ONE_FAILS = r"""
import sys, time
from types import SimpleNamespace
import torch.distributed as dist
from train_stand_ins import run_train, stand_in_early_checks
import finetune.distributed.processes  # (accelerate: seconds) before the processes join, as the run's errors meet them after it
from finetune.errors import FinetuneError

dist.init_process_group("gloo")
if dist.get_rank() == 1:  # a loaded machine: process 1 reads the first's line a moment after it saw it posted
    import torch.distributed.distributed_c10d as c10d
    store = c10d._get_default_store()

    class SlowStore:
        def __getattr__(self, name):
            return getattr(store, name)

        def get(self, key):
            time.sleep(1)
            return store.get(key)

    c10d._get_default_store = SlowStore
stand_in_early_checks(output_dir=sys.argv[1])

def train(recipe, **options):
    if dist.get_rank() == 1:
        raise FinetuneError("checkpoint X is damaged (a file process 1 alone reads)" if sys.argv[2] == "alone" else "the weights hold NaN")
    time.sleep(0.5)
    if sys.argv[2] == "both":
        raise FinetuneError("the weights hold NaN")
    time.sleep(5)
    return SimpleNamespace(interrupted=True, stopped_by=2)  # SIGINT

sys.exit(run_train(train))
"""


def test_an_error_one_process_meets_alone_is_said_by_it_and_one_they_all_meet_once(tmp_path):
    # Side by side: each launch is 2 interpreters that mostly wait.
    launches = {mode: start_processes(ONE_FAILS, str(tmp_path / mode), mode, world_size=2, per_machine=2) for mode in ("alone", "both")}
    said = outputs(launches["alone"] + launches["both"])
    results = {"alone": said[:2], "both": said[2:]}
    codes = {mode: [process.returncode for process in processes] for mode, processes in launches.items()}
    assert codes == {"alone": [130, 2], "both": [2, 2]}, results
    errors = {mode: [[line for line in stderr.splitlines() if line.startswith("error:")] for _, stderr in said] for mode, said in results.items()}
    assert errors == {"alone": [[], ["error: checkpoint X is damaged (a file process 1 alone reads)"]],
                      "both": [["error: the weights hold NaN"], []]}, results  # fmt: skip


def test_the_first_process_keeps_the_store_up_as_long_as_another_waits_for_its_line(monkeypatch):
    """Where it hosts the launch's store, the first process waits for the others' reads of its line before it exits: it gave
    up after 5 s, while another process that failed too waits ERROR_WAIT (10 s) for that line, as long as a collective's error
    may take to reach the processes on a busy machine; one reading it 5 to 10 s late found the store gone and said it again."""
    from types import SimpleNamespace

    import finetune.distributed.error_exchange as error_exchange

    now = [0.0]
    monkeypatch.setattr(error_exchange, "time", SimpleNamespace(monotonic=lambda: now[0], sleep=lambda seconds: now.__setitem__(0, now[0] + seconds)))
    late = error_exchange.ERROR_WAIT.total_seconds() - 1  # the other process's read, as late as its own wait lets it come

    class Store:
        def add(self, key, amount):
            return 1 if now[0] >= late else 0

    error_exchange._wait_for_readers(Store(), others=1)
    assert late <= now[0] < late + 1
