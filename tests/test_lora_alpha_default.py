"""lora.alpha unset follows lora.rank (a scale alpha/rank of 1 at any rank, as diffusers' examples and SimpleTuner
default it); it was 16 whatever the rank, so rank 4 trained at scale 4 and rank 64 at 0.25. What is saved is the alpha
as trained, and a resume of a checkpoint made with the old default keeps the scale its run started with."""

import json
import math

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
from finetune.config import LoRAConfig
from finetune.config.methods import RSLORA_ALPHA
from finetune.config.run_recipe import RUN_RECIPE
from finetune.formats.kohya import load_lora
from finetune.training.trainer import train


def test_an_unset_alpha_is_the_rank_and_a_set_one_is_kept():
    for rank in (4, 16, 64):
        assert LoRAConfig(rank=rank).alpha / rank == 1
        assert LoRAConfig(rank=rank, alpha=None).alpha / rank == 1  # `alpha: null`, as recipes/lora.yaml writes it
    assert LoRAConfig(rank=4, alpha=2).alpha == 2 and not LoRAConfig(rank=4, alpha=2).alpha_unset
    assert LoRAConfig(rank=4).alpha_unset
    # LoCon's conv_alpha unset keeps the other layers' scale: 1 too.
    conv_rank, conv_alpha = LoRAConfig(rank=16, conv_rank=4).conv_rank_alpha()
    assert conv_alpha / conv_rank == 1


def test_rslora_keeps_one_alpha_at_every_rank():
    """rsLoRA scales by alpha/sqrt(rank) so that one alpha serves every rank: an alpha following the rank would scale
    by sqrt(rank), larger the higher the rank."""
    scales = {rank: LoRAConfig(rank=rank, use_rslora=True).alpha / math.sqrt(rank) for rank in (4, 16, 64)}
    assert scales == {rank: RSLORA_ALPHA / math.sqrt(rank) for rank in (4, 16, 64)}
    lora = LoRAConfig(rank=16, conv_rank=4, use_rslora=True)
    conv_rank, conv_alpha = lora.conv_rank_alpha()
    assert math.isclose(conv_alpha / math.sqrt(conv_rank), lora.alpha / math.sqrt(lora.rank))


def test_an_unset_alpha_at_its_default_is_no_lora_setting_under_another_method(make_recipe):
    # lora.rank 8 is one: refused under method full, as any setting of a LoRA; alpha unset is not named with it.
    assert LoRAConfig(rank=8).changed() == ["rank"]
    assert LoRAConfig(rank=8, alpha=8).changed() == ["rank"]  # alpha at what an unset one is
    assert LoRAConfig(rank=8, alpha=4).changed() == ["rank", "alpha"]
    assert make_recipe(method="full").lora.changed() == []


def test_a_lora_trained_with_alpha_unset_records_the_alpha_it_trained_with(make_recipe):
    result = train(make_recipe(train__max_steps=1, lora__rank=4, lora__alpha=None))
    lora_file = result.output_dir / LORA_WEIGHTS_NAME
    with safe_open(str(lora_file), "pt") as f:
        metadata = f.metadata()
    assert float(metadata["finetune.alpha"]) == 4 and metadata["finetune.rank"] == "4"
    assert json.loads(metadata["lora_adapter_metadata"])["unet.lora_alpha"] == 4  # what diffusers' load_lora_weights applies
    assert {(layer.rank, layer.alpha) for layer in load_lora(lora_file).layers.values()} == {(4, 4.0)}  # the kohya export's
    assert yaml.safe_load((result.output_dir / RUN_RECIPE).read_text())["lora"]["alpha"] == 4  # what a resume from it reads


def test_a_checkpoint_made_with_the_old_default_resumes_at_its_own_scale(make_recipe, tmp_path, capsys):
    """A run from before, at rank 4 with alpha unset, trained at alpha 16 (its checkpoint records it, filled in); resumed
    with the same recipe, alpha unset, it goes on at 16, as the uninterrupted run does, saying so."""
    train(make_recipe(train__max_steps=2, lora__rank=4, lora__alpha=16.0))  # the old default, as its checkpoint recorded it
    capsys.readouterr()
    resumed = train(make_recipe(train__max_steps=3, lora__rank=4, lora__alpha=None), resume="latest")
    out = capsys.readouterr().out
    assert "warning: lora.alpha is unset: 16 as checkpoint-2 trained, where a new run takes 4 (the rank): set lora.alpha" in out
    assert "settings changed" not in out
    whole = train(make_recipe(train__max_steps=3, lora__rank=4, lora__alpha=16.0, output_dir=str(tmp_path / "whole")))
    trained, expected = (load_file(run.output_dir / LORA_WEIGHTS_NAME) for run in (resumed, whole))
    assert trained.keys() == expected.keys() and all(torch.equal(trained[key], expected[key]) for key in expected)
    with safe_open(str(resumed.output_dir / LORA_WEIGHTS_NAME), "pt") as f:
        assert float(f.metadata()["finetune.alpha"]) == 16
