"""The end of a run that trained to its last step: its outputs, its last checkpoint and its final samples, in that
order, so that a kill at any point leaves what a resume needs (the outputs before the checkpoint that says the run is done)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from finetune.atomic_files import outputs_written

# A checkpoint's state: its step's validation is still to draw, by its resume (the key is named from when only a stop's recorded it).
VALIDATION_PENDING = "stopped_before_validation"
# ...and the train logs of its step, written again where its resume draws that step's grid again (TensorBoard purges from it).
LOGGED_AT_STEP = "logged_at_step"


def finish_training(result, stop, output_dir: Path, checkpoints_dir: Path, save_outputs: Callable[[Path], list[Path]],
                    save_checkpoint: Callable[[], None], validate: Callable[[int], Path | None], checkpoint_saved: bool) -> None:  # fmt: skip
    """Collective: the trainer's end, once `result.final_step` is the run's last (`checkpoint_saved`: the loop saved that step's
    checkpoint). A Ctrl-C or SIGTERM now skips the last samples but waits for the outputs (a second one interrupts). Outputs
    first: a kill later leaves them, one before leaves no last checkpoint (with it, --resume latest had nothing to train)."""
    with stop, outputs_written(output_dir, checkpoints_dir):  # the loop's request: a stop in the last step skips the samples
        try:
            result.saved_files = save_outputs(output_dir)
        finally:  # whatever happens while writing the outputs, the trained state goes to disk (a longer run resumes it)
            if not checkpoint_saved:
                save_checkpoint()
        if not stop.agreed_now():
            validate(result.final_step)  # the outputs' paths are the result's (`finetune train` ends with them: output: PATH)
