"""A run whose weights blow up stops before it saves them, keeping the last good checkpoint."""

from pathlib import Path

import pytest
import torch

from finetune.checkpoints.run_files import list_checkpoints
from finetune.errors import FinetuneError
from finetune.training.trainer import train


def test_weights_turned_nan_are_not_saved_and_the_last_good_checkpoint_stays(make_recipe, monkeypatch):
    import finetune.training.trainer as trainer

    built, build_optimizer = [], trainer.build_optimizer
    monkeypatch.setattr(trainer, "build_optimizer", lambda *args, **kwargs: built.append(build_optimizer(*args, **kwargs)) or built[-1])

    def blow_up(step):  # as a diverging run: a trained weight turns NaN after step 3
        if step == 3:
            with torch.no_grad():
                built[-1].param_groups[0]["params"][0].fill_(float("nan"))

    recipe = make_recipe(train__max_steps=4, checkpoint__every_n_steps=1, checkpoint__keep_last=1)
    with pytest.raises(FinetuneError, match=r"NaN or infinite values at step 3 \(1 tensor\): training diverged.*checkpoint-2, is kept"):
        train(recipe, on_step=blow_up)
    output_dir = Path(make_recipe().output_dir)
    assert [p.name for p in list_checkpoints(output_dir / "checkpoints")] == ["checkpoint-2"]  # the rotation did not delete it
    assert not (output_dir / "pytorch_lora_weights.safetensors").exists()
