"""How long the stop agreement (`finetune.distributed.stopping`) waits for the other processes, and which of them did not answer when
that runs out.

A sum of stop flags started at a step boundary is complete once every process has started it at the same boundary: its
wait spans how far the processes are apart there, not a step, a checkpoint or a validation (the processes wait for one
another after those in the main group's barriers). In a healthy run that distance stays below the main group's timeout
plus the work after a step's last collective (the optimizer step, the logs): a process further behind would have failed
the main group's collective first, whose timeout counts from the first process's call. So the agreement waits that
timeout and `MARGIN` more: 15 minutes under NCCL's default of 10, not gloo's own 30 minutes whatever the main group's."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
from datetime import timedelta

import torch

from finetune.distributed.process_env import processes_on_this_machine
from finetune.errors import FinetuneError

MARGIN = timedelta(minutes=5)  # the work after a step's last collective, on the process furthest behind
STORE_WAIT = timedelta(seconds=30)  # for the rendezvous store's answer, once the agreement has failed


def agreement_timeout() -> timedelta:
    return main_group_timeout() + MARGIN


def main_group_timeout() -> timedelta:
    """The main process group's timeout: accelerate's InitProcessGroupKwargs, DEEPSPEED_TIMEOUT under DeepSpeed, else torch's
    default (10 minutes under NCCL, 30 under gloo)."""
    group, found = torch.distributed.group.WORLD, []
    for device in getattr(group, "_device_types", ()):
        with contextlib.suppress(Exception):  # torch's private layout; gloo's default below where it moved
            found.append(group._get_backend(device).options._timeout)
    return max(found, default=torch.distributed.default_pg_timeout)


class Answers:
    """Which of the agreement's sums each process has started, in the rendezvous store the main group was made with: one
    key per process, set at each step boundary (a few bytes sent without waiting for a reply: microseconds)."""

    _agreements = itertools.count()  # every process makes its agreements in the same order: the same keys everywhere

    def __init__(self, store, prefix: str, rank: int, size: int, timeout: timedelta):
        self.store, self.prefix, self.rank, self.size, self.timeout = store, prefix, rank, size, timeout
        self.started = 0

    @classmethod
    def of_this_run(cls, timeout: timedelta) -> Answers:
        """This process's, in the default group's store, under keys of an agreement of its own."""
        store, prefix = torch.distributed.distributed_c10d._get_default_store(), f"finetune/stop-agreement/{next(cls._agreements)}/"
        return cls(store, prefix, torch.distributed.get_rank(), torch.distributed.get_world_size(), timeout)

    def start(self) -> None:
        """Before this process starts its next sum."""
        self.started += 1
        self.store.set(f"{self.prefix}{self.rank}", str(self.started))

    def behind(self) -> list[int] | None:
        """The other processes that have not started the last sum this one started; None where the store does not answer
        either (the main machine, which holds it, gone)."""
        before = self.store.timeout
        self.store.set_timeout(STORE_WAIT)
        try:
            counts = {rank: int(self.store.get(key)) if self.store.check([key]) else 0
                      for rank in range(self.size) if rank != self.rank for key in [f"{self.prefix}{rank}"]}  # fmt: skip
        except RuntimeError:  # torch's DistStoreError among them
            return None
        finally:
            self.store.set_timeout(before)
        return [rank for rank, count in counts.items() if count < self.started]

    def failure(self, error: RuntimeError) -> FinetuneError:
        """The line for the last sum started, which gloo gave up on (`error`): who did not answer, and what to do."""
        behind, gloo = self.behind(), gloo_sentence(str(error))
        then = "end the run if it still waits (its last checkpoint is kept), then continue with --resume latest"
        waited = f"in {_duration(self.timeout)} (the main process group's timeout and {_duration(MARGIN)} more)"
        if behind:
            one = len(behind) == 1
            names = f"process {behind[0]}" if one else f"processes {', '.join(map(str, behind))}"
            problem = FinetuneError(
                f"{names} (of {self.size}) did not answer the stop agreement {waited}: {'it is' if one else 'they are'} hung, or gone with a machine "
                f"(gloo: {gloo}); {'its own log says' if one else 'their own logs say'} where {'it' if one else 'they'} stopped "
                f"(`py-spy dump --pid PID` shows a hung process's stack); {then}"
            )
        elif behind is None:
            problem = FinetuneError(
                f"the stop agreement got no answer {waited} (gloo: {gloo}), nor did the rendezvous store on the main machine "
                f"({os.environ.get('MASTER_ADDR', 'MASTER_ADDR')}): that machine may be down or cut off; {then}"
            )
        else:  # every process had answered: one of them ended since (a crash), or the network between them failed
            problem = FinetuneError(f"the stop agreement lost another process (gloo: {gloo}): it ended or its machine went down, and its own log says why; {then}")
        problem.said_here = self._says_it(behind)
        return problem

    def _says_it(self, behind: list[int] | None) -> bool:
        """Whether this process says the line for its machine: the first of the machine's processes that answered (the first
        one may be the one that did not). Torchrun numbers a machine's processes in a row."""
        if behind is None:
            return True
        local_rank, on_this_machine = int(os.environ.get("LOCAL_RANK", "0")), processes_on_this_machine() or 1
        machine = range(self.rank - local_rank, self.rank - local_rank + on_this_machine)
        return self.rank == min(rank for rank in machine if rank not in behind)


def gloo_sentence(text: str) -> str:
    """Gloo's message without its source location, up to its first full stop ('Connection closed by peer [ADDRESS]:PORT')."""
    lines = text.strip().splitlines() or [""]
    return re.sub(r"^\[[^\]]*\]\s*", "", lines[-1]).split(". ")[0].rstrip(".")


def _duration(span: timedelta) -> str:
    seconds = int(span.total_seconds())
    return f"{seconds // 60} minutes" if seconds % 60 == 0 else f"{seconds} s"
