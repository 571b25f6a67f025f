"""A checkpoint not written by finetune (downloaded, or shared with a recipe): accelerate reads the LR scheduler's state
(custom_checkpoint_0.pkl) with torch.load(weights_only=False), so a file made to run code ran it at `--resume`. One of
ours holds numbers alone there, in torch's zip format; one holding other objects, or of a format whose objects cannot be
listed before it is unpickled (torch's legacy format, a plain pickle), is refused in one line before anything is unpickled.
(DeepSpeed's own checkpoint files are pickles DeepSpeed reads whole: the README says to resume only your own.)"""

import shutil

import pytest
import torch
from test_untrusted_checkpoints import RunsCodeWhenUnpickled

from finetune import trainer
from finetune.errors import FinetuneError


@pytest.mark.parametrize("written", [{}, {"_use_new_zipfile_serialization": False}, {"pickle_protocol": 4}], ids=["zip", "legacy-format", "protocol-4"])
def test_a_checkpoint_whose_scheduler_state_would_run_code_is_refused_before_it_is_unpickled(make_recipe, tmp_path, written):
    common = dict(train__max_steps=2, checkpoint__every_n_steps=2, validation__prompts=[])
    run = trainer.train(make_recipe(output_dir=str(tmp_path / "run"), **common)).output_dir
    shutil.copytree(run, tmp_path / "copy")
    scheduler_state = tmp_path / "copy" / "checkpoints" / "checkpoint-2" / "custom_checkpoint_0.pkl"
    marker = tmp_path / "code-ran"
    state = {**torch.load(scheduler_state, weights_only=True), "extra": RunsCodeWhenUnpickled(marker)}
    torch.save(state, scheduler_state, **written)  # legacy format, protocol 4's STACK_GLOBAL: torch's scan lists no names there
    with pytest.raises(FinetuneError) as raised:
        trainer.train(make_recipe(output_dir=str(tmp_path / "copy"), **{**common, "train__max_steps": 3}), resume="latest")
    assert not marker.exists()
    if written:
        assert str(raised.value).startswith(f"checkpoint {scheduler_state.parent}: custom_checkpoint_0.pkl is not the file accelerate writes (")
        return
    assert str(raised.value).startswith(f"checkpoint {scheduler_state.parent}: custom_checkpoint_0.pkl holds objects besides a scheduler's state (")
    assert "makedirs" in str(raised.value) and str(raised.value).endswith("resume only from checkpoints you wrote, or start a new run from its outputs")
    # The checkpoint as finetune wrote it resumes.
    assert trainer.train(make_recipe(output_dir=str(run), **{**common, "train__max_steps": 3}), resume="latest").final_step == 3
