"""Stopping cleanly: Ctrl-C or SIGTERM end a run at a step boundary with a checkpoint, on every process
at once, and the data loader's worker processes neither die first nor outlive the run."""

from __future__ import annotations

import contextlib
import signal

import torch
from accelerate import Accelerator


class StopRequest:
    """Ctrl-C / SIGTERM set a flag; the loop stops at the next step boundary, saves, and exits.

    A second Ctrl-C aborts at once (the last complete checkpoint is still there).
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, accelerator: Accelerator) -> bool:
        """All processes stop together, or none does (a lone stop would hang the others' collectives)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


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
