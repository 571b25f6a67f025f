"""Which number keys a micro-batch's noise and timesteps (`BatchRandomness`'s `micro_batch`) across resumes.

A run numbers its micro-batches step x gradient_accumulation_steps + micro, which a run never stopped draws each
once. A resume with other accumulation would number its first micro-batch from its checkpoint's step at the new
accumulation: from 4 to 2 at step 100, 200, though 400 were drawn, so it would draw the noise of micro-batches
200 to 399 again. A checkpoint records the micro-batches drawn before it (`DRAWN`); the resumed run's keys go on
from there, by an offset to its own numbering (0 for a run never stopped, or resumed at the same accumulation: the
same keys, the same run). A checkpoint from before the record keeps the numbering it had.
"""

from __future__ import annotations

from pathlib import Path

from finetune.checkpoints.run_files import read_state
from finetune.errors import FinetuneError

DRAWN = "micro_batches"  # checkpoint state: the micro-batches whose noise was drawn before it, in all


def key_offset(checkpoint: Path | None, accumulation: int) -> int:
    """What this run adds to its micro-batch number (step x `accumulation` + micro) for the key of its draws, resumed
    from `checkpoint` (None: a new run); a checkpoint's record that is not a count is one line, before anything loads."""
    if checkpoint is None:
        return 0
    state = read_state(checkpoint)
    step = state.get("step", 0)
    drawn = state.get(DRAWN, step * accumulation)
    if not isinstance(drawn, int) or isinstance(drawn, bool) or drawn < 0:
        raise FinetuneError(f"checkpoint {checkpoint}: its {DRAWN} ({drawn!r}) is not a count of micro-batches (edited by hand?): "
                            f"restore it, or resume from another checkpoint")  # fmt: skip
    return drawn - step * accumulation

