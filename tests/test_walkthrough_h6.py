"""Walkthrough h6: the training knobs do what they say (logged loss terms, optimizer settings)."""

import pytest
from accelerate import Accelerator

from finetune.toyworld.datasets import write_folder
from finetune.trainer import train


def test_logged_loss_terms_average_every_micro_batch_as_the_loss_does(make_recipe, tmp_path, monkeypatch):
    """DreamBooth's instance and class losses in TensorBoard cover the same micro-batches as train/loss (all of a
    step's accumulation), so train/loss = instance_loss + prior_loss_weight x class_loss at every logged step."""
    star = write_folder(tmp_path / "star", 3, seed=11, include_held_out="only_shape")
    concept = {"instance_dir": str(star), "instance_prompt": "a sks shape", "class_prompt": "a shape"}
    dreambooth = {"concepts": [concept], "num_class_images": 4, "prior_loss_weight": 0.5,
                  "class_generation": {"num_inference_steps": 2, "batch_size": 2}}  # fmt: skip
    logged = []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, log_kwargs=None: logged.append(values))
    recipe = make_recipe(method="dreambooth", dreambooth=dreambooth, data__image_dir=None, train__batch_size=1,
                         train__gradient_accumulation_steps=3, train__max_steps=3, logging__every_n_steps=1)  # fmt: skip
    train(recipe)
    steps = [values for values in logged if "train/loss" in values]
    assert len(steps) == 3
    for values in steps:
        assert values["train/loss"] == pytest.approx(values["train/instance_loss"] + 0.5 * values["train/class_loss"], rel=1e-5)

