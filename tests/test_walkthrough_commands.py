"""Walkthrough of the commands run after training (sample, eval, merge, export-checkpoint): options that did
nothing, or did something else than asked, without a word."""

import pytest

from finetune.cli import main


def refuse_to_sample(*args, **kwargs):
    raise AssertionError("sampled: the options should have been refused before any model loads")


def test_a_lora_scale_without_a_lora_is_refused_before_sampling(tmp_path, monkeypatch, capsys):
    """sample --lora-scale 0.5 without --lora sampled the base model at no strength at all, and said nothing (eval refused it)."""
    monkeypatch.setattr("finetune.inference.sample_to_folder", refuse_to_sample)
    argv = ["sample", "--base", "finetune/assets/toyworld-base", "--lora-scale", "0.5", "--prompt", "a star", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "--lora-scale is the LoRA's strength: pass --lora too, or leave it out" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
