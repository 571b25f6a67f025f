"""Checkpoints and resuming, as a user meets them: a stop at the last step, a full disk."""

import os
import signal

import finetune.trainer as trainer
from finetune.checkpoint import list_checkpoints
from finetune.methods.lora import LORA_WEIGHTS_NAME


def test_a_stop_during_the_last_step_finishes_the_run_with_its_outputs(make_recipe, tmp_path):
    """Ctrl-C while the last step trained stopped as mid-run: a checkpoint of the last step and no outputs,
    and `--resume latest` then had nothing left to train. It finishes now, skipping only the last samples."""
    recipe = make_recipe(output_dir=str(tmp_path / "run"), train__max_steps=3, validation__prompts=["a shape"],
                         validation__num_inference_steps=1, validation__at_start=False)  # fmt: skip
    result = trainer.train(recipe, on_step=lambda step: os.kill(os.getpid(), signal.SIGINT) if step == 3 else None)
    assert not result.interrupted and result.final_step == 3 and not result.sample_grids
    assert (result.output_dir / LORA_WEIGHTS_NAME).is_file()
    assert [p.name for p in list_checkpoints(result.output_dir / "checkpoints")] == ["checkpoint-3"]
