"""accelerate's process-wide settings after a train() that stopped: the next train() in the process starts clean."""

from __future__ import annotations

import pytest
from accelerate.state import AcceleratorState

from finetune.errors import FinetuneError
import finetune.training.trainer as trainer


def test_a_run_that_stopped_after_its_accelerator_leaves_its_precision_to_no_later_run(make_recipe, tmp_path, monkeypatch):
    """Stopped with an error once the Accelerator exists (here at loading the base), a bf16 run left its settings
    behind: the next train() at another precision (a notebook, a sweep, the bench's variants) failed with
    "AcceleratorState has already been initialized"."""
    precisions = []

    def stop_at_loading(*args, **kwargs):
        precisions.append(AcceleratorState().mixed_precision)
        raise FinetuneError("stopped at loading")

    monkeypatch.setattr(trainer, "load_base_model", stop_at_loading)
    for precision in ("bf16", "no"):
        with pytest.raises(FinetuneError, match="^stopped at loading$"):
            trainer.train(make_recipe(train__mixed_precision=precision, output_dir=str(tmp_path / precision)))
    assert precisions == ["bf16", "no"]
    assert not AcceleratorState._shared_state  # nor to the tests after this one




def test_a_run_that_stopped_with_an_error_closes_its_tensorboard_writer(make_recipe, tmp_path, monkeypatch):
    """The TensorBoard writer was closed only at a run's normal end: a run that failed after logging (here in its second
    step) left it open, its event file and its flushing thread, in every process that trains again (a notebook, a sweep)."""
    accelerators = []

    class Recorded(trainer.Accelerator):  # the run's Accelerator, to see its trackers once train() has failed
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            accelerators.append(self)

    def fail(step):  # called before the step's logs: step 1's are written, then the run fails
        if step == 2:
            raise FinetuneError(f"failed after step {step}")

    monkeypatch.setattr(trainer, "Accelerator", Recorded)
    with pytest.raises(FinetuneError, match="^failed after step 2$"):
        trainer.train(make_recipe(logging__tensorboard=True, logging__every_n_steps=1, output_dir=str(tmp_path / "failed")), on_step=fail)
    [writer] = [tracker.writer for tracker in accelerators[0].trackers]
    assert writer.all_writers is None  # torch's SummaryWriter after close(): its event files flushed and closed, their threads ended
    assert list((tmp_path / "failed" / "logs" / "finetune").glob("events.out.tfevents.*"))
