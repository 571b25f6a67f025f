"""Stopping cleanly: Ctrl-C or SIGTERM end a run at a step boundary with a checkpoint, on every process
at once, and the data loader's worker processes neither die first nor outlive the run."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator

from finetune.distributed.gloo_interface import new_gloo_group
from finetune.distributed.process_env import main_process
from finetune.distributed.stop_answers import Answers, agreement_timeout
from finetune.stop_signals import interrupt_for


class StopRequest:
    """Ctrl-C / SIGTERM set a flag; the loop stops at a step boundary, saves, and exits.

    A second Ctrl-C aborts at once (the last complete checkpoint is still there), raised as the signal it is (a second
    SIGTERM stops as SIGTERM, not as Ctrl-C). `signal` is the stop's (SIGINT or SIGTERM, else 0): with several processes,
    the highest any of them was sent, so every process exits as one stopped by it. They agree on the step over a gloo
    group of their own (created here, by every process in the same order): the flag stays in host memory, so agreeing
    never waits for a GPU's queue, whatever the main backend (NCCL). A process that does not answer within the main
    group's timeout and 5 minutes (`finetune.distributed.stop_answers`) ends the others with a line naming it.
    """

    def __init__(self, accelerator: Accelerator):
        self.requested = False
        self.signal = 0  # the stop's, once requested (or agreed)
        self._previous = {}
        self._group = self._answers = None
        if accelerator.num_processes > 1:
            timeout = agreement_timeout()
            self._group = new_gloo_group(timeout)  # over which network interface: gloo_interface
            self._answers = Answers.of_this_run(timeout)  # who started which sum, for the line where one does not come
        self._pending = None  # (work, flag): the sum started at the last step's agreed(), read at the next
        self._launcher = lone_launcher() if accelerator.num_processes == 1 else None
        self._said_at_once = None  # while set (`said_at_once`): the line a first stop says as it comes, given its signal

    @contextlib.contextmanager
    def said_at_once(self, line: Callable[[int], str]):
        """Within the block, a first stop is said the moment it comes (`line(signum)`, by the main process), not only
        at the next step boundary: for work that takes minutes with no boundary to stop at (the final samples)."""
        self._said_at_once = line
        try:
            yield
        finally:
            self._said_at_once = None

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise interrupt_for(signum)
        self.requested, self.signal = True, max(self.signal, signum)
        if self._said_at_once is not None and main_process():
            _said_from_a_handler(f"\n{self._said_at_once(signum)}\n")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self) -> bool:
        """At each step boundary: whether every process stops here (all together, or none: a lone stop would hang
        the others' collectives). With several processes this reads the "sum" of the flags (their highest: each is the
        stop's signal number) started at the previous step boundary, which has had a whole step to arrive, and starts the
        next: each process reads the same sum at the same step, so a stop is seen one step after the request, on every process at once."""
        if self._group is None:
            self._notice_the_launcher_gone()
            return self.requested
        stop = self._pending is not None and self._finish() > 0
        if not stop:  # after a stop nothing is left running
            self._start()
        return stop

    def agreed_now(self) -> bool:
        """Once, after the loop: whether any process was asked to stop by now (waits for the others' answer)."""
        if self._group is None:
            self._notice_the_launcher_gone()
            return self.requested
        if self._pending is not None:
            self._finish()  # older than the sum below: a request is never withdrawn
        self._start()
        return self._finish() > 0

    def _notice_the_launcher_gone(self) -> None:
        """A lone process's launcher ended (`lone_launcher`): a stop, as SIGTERM's, which had ended it."""
        if self._launcher is not None and not self.requested and os.getppid() != self._launcher:
            print(f"\naccelerate launch (process {self._launcher}) has ended: stopping as on SIGTERM", file=sys.stderr, flush=True)
            self.requested, self.signal = True, signal.SIGTERM

    def close(self, after_error: bool = False) -> None:
        """After the run; `after_error`: without waiting for a sum left running, which a process that failed mid-step
        would never join (and without raising: the run's own error is the one to see)."""
        if self._group is None:
            return
        if self._pending is not None and not after_error:
            self._finish()
        self._pending = None
        with contextlib.suppress(RuntimeError) if after_error else contextlib.nullcontext():
            torch.distributed.destroy_process_group(self._group)
        self._group = None

    @contextlib.contextmanager
    def closed_at_the_end(self):
        """This request, closed when the block ends: after an error too (a later run in the process would otherwise
        find the group left over), as `close(after_error=True)` there."""
        try:
            yield self
        except BaseException:
            self.close(after_error=True)
            raise
        self.close()

    def _start(self) -> None:
        # The stop's signal number, 0 for none: the highest is the run's (SIGTERM's 15 over SIGINT's 2), so a process
        # that was sent nothing exits as the others do. On the host: gloo's thread reduces it.
        flag = torch.tensor([self.signal if self.requested else 0], dtype=torch.int32)
        self._answers.start()
        self._pending = (torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group, async_op=True), flag)

    def _finish(self) -> int:
        work, flag = self._pending
        self._pending = None
        try:
            work.wait()
        except RuntimeError as error:  # gloo gave up: a timeout, or a process gone
            raise self._answers.failure(error) from error
        self.signal = max(self.signal, int(flag[0]))
        return int(flag[0])


def _said_from_a_handler(text: str) -> None:
    """`text` on stderr from a signal handler, which nothing it meets may end: an error raised here would end the work the
    stop lets finish (the final samples). By the file descriptor: the handler may run inside a write to sys.stderr (a
    progress bar's), which a second write there refuses (a reentrant call). A stream without one (a caller's StringIO, a
    notebook's on some systems: io.UnsupportedOperation), or a closed stderr, gets its own write, or nothing."""
    try:
        os.write(sys.stderr.fileno(), text.encode())
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
        with contextlib.suppress(AttributeError, OSError, ValueError, RuntimeError):
            sys.stderr.write(text)


def lone_launcher() -> int | None:
    """The process id of the `accelerate launch` that started this process alone (its launcher for one process: it waits
    for the process, nothing more), else None. A SIGTERM sent to that launcher (`timeout`, a job scheduler, `kill` of the
    process it shows) ended it and left this process training, unseen: the training loop watches for its end (a changed
    parent). Not under torchrun (`accelerate launch` of several processes), whose agent passes its signals on to the
    processes, nor under a shell or `nohup`, whose end must not stop the run."""
    if "LOCAL_RANK" in os.environ:  # torchrun's
        return None
    from finetune.distributed.launch_options import launcher_command_line

    parent = os.getppid()
    arguments = launcher_command_line()[:3]  # python, .../bin/accelerate, launch (or -m accelerate.commands.launch); [] if unread
    launched = any(Path(argument).name == "accelerate" or argument.startswith("accelerate.commands") for argument in arguments)
    return parent if launched else None


def leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """In data-loader workers: `timeout`, systemd and SLURM send SIGTERM (and a terminal Ctrl-C) to the
    whole process group; a worker it killed would crash the run before the trainer saves and stops."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def batches_of(loader: torch.utils.data.DataLoader):
    """The loader's endless stream of batches, whose worker processes stop on the way out, an error
    included: they ignore SIGTERM (above), so the interpreter's exit, which terminates and then waits
    for them, would otherwise wait forever."""
    batches = iter(loader)
    try:
        yield batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # what the iterator's __del__ calls
        if shutdown is not None:
            shutdown()
