"""accelerate keeps a run's settings (mixed precision, DeepSpeed's plugin, gradient accumulation) in process-wide
singletons, AcceleratorState and GradientState, which the next `Accelerator()` in the process must match: a second
`train()` at another precision failed with "AcceleratorState has already been initialized". A notebook, a sweep, the
bench's variants and the tests train several times in one process, also after a run that stopped with an error
(a bad image, a NaN, a refused setting), so the settings are cleared however `train()` ends; so are its trackers closed."""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, TypeVar

from accelerate.state import AcceleratorState, GradientState

Run = TypeVar("Run", bound=Callable)


def clear_accelerate_settings() -> None:
    """The run's precision and accumulation settings go; PartialState (the process group, the device) stays: a
    later run in this process joins the same group (gloo's second rendezvous fails), and the program closes it."""
    AcceleratorState._reset_state()
    GradientState._reset_state()


def clears_accelerate_settings(run: Run) -> Run:
    """`run` (the trainer's `train`), clearing accelerate's settings when it returns or raises."""

    @functools.wraps(run)
    def cleared(*args, **kwargs):
        try:
            return run(*args, **kwargs)
        finally:
            clear_accelerate_settings()

    return cleared  # type: ignore[return-value]


@contextlib.contextmanager
def trackers_finished(accelerator) -> Iterator[None]:
    """The run's trackers (TensorBoard's writer: its events still queued, its thread) end with the block, at the run's
    end or error: a failed run's logs held its last steps' losses only in memory. After an error, a tracker that cannot
    finish (a full disk) leaves the run's own error to be seen. Not accelerator.end_training(): it also closes the process
    group, and a later train() in this process could not reliably join again (gloo's second rendezvous fails); the
    program closes it."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            _finish(accelerator)
        raise
    _finish(accelerator)


def _finish(accelerator) -> None:
    for tracker in accelerator.trackers:
        tracker.finish()
