"""DreamBooth's class images made by several processes (each its share): one process's images that decode to NaN stop every
process with the same line, none left waiting for it in a collective. Two processes forked from the test's, joined over gloo (tests/ranks.py)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from diffusers.image_processor import VaeImageProcessor

from finetune.config import ClassImageGeneration
from finetune.dreambooth.class_images import generate_class_images, generate_on_every_process
import finetune.dreambooth.class_images as class_images
from ranks import run_ranks

SETTINGS = ClassImageGeneration(num_inference_steps=2, guidance_scale=3.0, batch_size=2, seed=5)


@pytest.fixture
def nan_on_rank_1(monkeypatch):
    """The pipeline call made by process 1 decodes to NaN (a guidance far too high, on its prompts); process 0's are fine."""

    def make(pipeline, class_prompts, batch, settings, resolution):
        value = float("nan") if os.environ["RANK"] == "1" else 0.5
        return torch.full((len(batch), 3, 8, 8), value)

    monkeypatch.setattr(class_images, "_make", make)
    monkeypatch.setattr(class_images, "chunks_needed", lambda tokenizer, prompts: 1)  # no tokenizer: every prompt fits one chunk


def test_class_images_that_decode_to_nan_on_one_process_stop_every_process_with_its_line(nan_on_rank_1, tmp_path):
    """Before, process 1 raised alone while process 0 waited for it in the barrier after generating, which then ended in gloo's
    traceback of a closed connection once process 1 had exited."""
    # A scheduler of SD's own spacing: its step count is checked (finetune.sampling.samplers.spacing_steps_problem) before any image.
    scheduler = SimpleNamespace(config={"timestep_spacing": "leading"})
    folder, pipeline = tmp_path / "class", SimpleNamespace(tokenizer=None, image_processor=VaeImageProcessor(), scheduler=scheduler)

    def generate(accelerator):
        generate_on_every_process(accelerator, lambda: generate_class_images(
            pipeline, ["a shape"], folder, "key", [0, 1, 2, 3], SETTINGS, 8, accelerator.process_index, accelerator.num_processes))  # fmt: skip

    said = run_ranks(generate, tmp_path)
    assert said[0] == said[1] and said[0].startswith("FinetuneError: class images of the class prompt 'a shape' decoded to NaN"), said
    assert sorted(path.name for path in folder.glob("*.png")) == ["key-00000.png", "key-00002.png"]  # process 0's share: kept


def test_processes_with_nothing_to_generate_wait_for_those_that_make_images(tmp_path):
    """A process with no share (None) still meets the others in the same collective: the run goes on on both."""
    assert run_ranks(lambda accelerator: generate_on_every_process(accelerator, None if accelerator.process_index else lambda: None), tmp_path) == ["done", "done"]
