"""accelerate's process-wide settings after a train() that stopped: the next train() in the process starts clean."""

from __future__ import annotations

import pytest
from accelerate.state import AcceleratorState

import finetune.trainer as trainer
from finetune.errors import FinetuneError


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
