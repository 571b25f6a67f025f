"""The error line of a run of several processes, said once per machine where every process meets it, and by the process
that met it where it met it alone: the processes exchange their lines in the launch's rendezvous store, and the one
keeping that store up waits, after its line is said, for the others to read theirs (`finetune.cli.train_command`)."""

from __future__ import annotations

import contextlib
import os
import re
import time
from datetime import timedelta
from pathlib import Path

import torch

from finetune.distributed.process_env import first_on_its_machine, machine_count, machine_number
from finetune.distributed.stop_answers import gloo_sentence
from finetune.errors import FinetuneError

# What gloo says where the process at the other end of a collective's connection is gone (killed, out of memory, crashed),
# or its machine: the first of them is what its connection meets, the others what a later send or read meets.
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
# gloo's errors (and the launch store's) begin a line with their C++ source location ("[.../tcp/pair.cc:534] Connection
# closed by peer"): a RuntimeError of Python's own making that mentions a reset connection (a download's) is not a peer lost.
C_SOURCE_LOCATION = re.compile(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]", re.MULTILINE)
# What NCCL (GPUs) says of the same, in torch's DistBackendError: ncclGetErrorString of ncclRemoteError, and torch's own
# reading of that code (torch/csrc/distributed/c10d/NCCLUtils.cpp, getNcclErrorDetailStr). Also where a communicator
# was aborted for it: "NCCL communicator was aborted on rank N. Original reason for failure was: ..." carries the reason.
NCCL_LOST_PEER = ("remote process exited or there was a network error", "ncclRemoteError")
# torch's NCCL watchdog (ProcessGroupNCCL.cpp) where a collective waited past the group's timeout: a process that did
# not join it, gone or hung, which this text alone cannot tell apart. Said as that, not as a process known to be gone.
NCCL_TIMED_OUT = "Watchdog caught collective operation timeout"


@contextlib.contextmanager
def lost_process_said(output_dir: str):
    """In a run of several processes: one of them gone (a SIGKILL, the out-of-memory killer) failed the next collective of
    every other one with gloo's or NCCL's traceback, which hid the cause (the process that ended says it, in its own log,
    if it could) and what to do. One line instead, said once per machine as any error the processes meet together
    (`says_its_error`)."""
    try:
        yield
    except RuntimeError as error:  # torch's DistBackendError among them
        if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            raise
        if (what := lost_process_line(str(error), torch.distributed.get_backend())) is None:
            raise
        raise FinetuneError(f"{what}: its own log says why; this one stops too: continue with --resume latest "
                            f"(the last checkpoint in {Path(output_dir) / 'checkpoints'} is kept)") from None  # fmt: skip


def lost_process_line(text: str, backend: str) -> str | None:
    """What a collective's error `text` (under the process group's `backend`) says of the run's other processes, where it
    says that one is gone or did not answer; None for any other error (raised as it is)."""
    if any(cause in text for cause in NCCL_LOST_PEER):
        return f"another process of the run ended, or its machine went down (NCCL: {NCCL_LOST_PEER[0]})"
    if NCCL_TIMED_OUT in text:
        waited = re.search(r"ran for (\d+) milliseconds", text)
        return (f"another process of the run ended or stopped answering (hung, or its machine went down): NCCL's watchdog ended "
                f"a collective that waited for it{f' {int(waited.group(1)) // 1000} s' if waited else ''}")  # fmt: skip
    if any(cause in text for cause in LOST_PEER) and C_SOURCE_LOCATION.search(text):
        return f"another process of the run ended, or its machine went down ({backend}: {gloo_sentence(text)})"
    return None


def says_its_error(line: str) -> bool | None:
    """Whether this process, its run failing with the error `line`, says it: each machine's first process does (as before
    the processes join), and another where its machine's first process did not fail with the same line within seconds
    (exchanged in the launch's rendezvous store). Said by each machine's first process alone, an error that another process
    met alone (a file or a write of its own) was said by no one, while the first process waited for it in the run. None
    where there is no group of processes: one process, or an error before they joined (every process meets those alike)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_world_size() == 1:
        return None
    store = torch.distributed.distributed_c10d._get_default_store()
    said = f"finetune/error-of-machine/{machine_number()}"
    readers = torch.distributed.get_world_size() - machine_count()  # every machine's processes but its first
    try:
        if first_on_its_machine():
            store.set(said, line)
            _keep_the_store_for_readers(store, readers)
            return True
        try:
            store.wait([said], ERROR_WAIT)  # a collective's error reaches every process at once: the first's comes within this
        except KeyboardInterrupt:  # Terminated too
            return _line_posted_now(store, said) != line
        first_said = store.get(said).decode()
        store.add(ERROR_LINES_READ, 1)
        _keep_the_store_for_readers(store, readers)
        return first_said != line
    except RuntimeError:  # (torch's DistStoreError) not set in time: the first process did not fail, or the store is gone
        return True


# How many processes, of every machine, have read their machine's first process's line.
ERROR_LINES_READ = "finetune/error-lines-read"
# A stopped process's one read of its first's line, where the store is slow or its machine cut off.
GLANCE_WAIT = timedelta(seconds=2)


def _line_posted_now(store, said: str) -> str | None:
    """The first process's line, read once without waiting for it, by a process stopped in that wait: torchrun's agent
    ends a machine's processes (SIGTERM) as the first of them exits, which a failing first does as soon as it has said
    its line. Stopped there, the process said nothing, though its own error may differ. None (so its own line is said)
    where the line is not posted or the store does not answer. The stopped process leaves at once: it keeps the store up
    for no one."""
    before = store.timeout
    store.set_timeout(GLANCE_WAIT)
    try:
        if not store.check([said]):
            return None
        first_said = store.get(said).decode()
        store.add(ERROR_LINES_READ, 1)
        return first_said
    except RuntimeError:  # (torch's DistStoreError) the store is gone with the agent, or does not answer in time
        return None
    finally:
        store.set_timeout(before)


def _keeps_the_store_up() -> bool:
    """Whether this process, exiting, can take the launch's store away from a process of any machine yet to read its first's
    line (which would then take the store's loss for "my first did not fail" and say the line again). Without torchrun's
    agent (DeepSpeed's launcher on several machines, MPI, Slurm, the tests' launches) rank 0's process hosts the store. Under
    torchrun and accelerate launch one machine's agent hosts it (machine 0's under accelerate's static rendezvous; under c10d's,
    whichever is at its endpoint: TORCHELASTIC_USE_AGENT_STORE) and exits with the first of its processes to fail, ending the
    others: there every process that failed keeps it up."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True) or torch.distributed.get_rank() == 0


# The launch's store and how many readers this process keeps it up for, once its line is said (`wait_for_error_readers`).
_store_kept_for_readers: tuple | None = None


def _keep_the_store_for_readers(store, readers: int) -> None:
    global _store_kept_for_readers
    if _keeps_the_store_up():
        _store_kept_for_readers = (store, readers)


def wait_for_error_readers() -> None:
    """After this process's error line is said (or left to its first), the wait `says_its_error` asked for, if any
    (`_wait_for_readers`). Waited before the line, an error met by this process alone was said READ_WAIT late."""
    global _store_kept_for_readers
    if _store_kept_for_readers is not None:
        (store, readers), _store_kept_for_readers = _store_kept_for_readers, None
        _wait_for_readers(store, readers)


def _wait_for_readers(store, others: int) -> None:
    """Keep the store up until the processes of every machine that failed too have read their first process's line (at once
    where all met it), or READ_WAIT has passed (those that did not fail never read it). Its process exiting at once, a process
    that had seen the line posted lost the store before reading it, and said the same line again; the first process of
    machine 0 waiting for its own machine's readers alone, a later machine's lost it so. A stop (Ctrl-C, or the agent ending
    this machine's processes as one of them exits) ends the wait, as does the store gone: the line is still said."""
    deadline = time.monotonic() + READ_WAIT.total_seconds()
    try:
        while store.add(ERROR_LINES_READ, 0) < others and time.monotonic() < deadline:
            time.sleep(0.02)
    except (RuntimeError, KeyboardInterrupt):
        pass


# Ample for a collective's error to reach the first process on a loaded machine (3 s was missed under a busy test run);
# a process that fails alone says its error this much later.
ERROR_WAIT = timedelta(seconds=10)
# The first process's wait for the others to read its line, after it said it: as long as they wait for it (a collective's
# error reaches them seconds apart on a busy machine), and what an error it meets alone ends its process later by.
READ_WAIT = ERROR_WAIT
