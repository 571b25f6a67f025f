"""Images that decode to NaN or inf (a guidance or a LoRA strength far too high; a run that diverged) were made black
without a word but numpy's "invalid value encountered in cast": one line names their prompt and seed and the likely
cause, and what was made is still saved; a validation grid's never stops training."""

import warnings

import numpy as np
import pytest

from finetune.models.loading import load_base_model
from finetune.sampling.finite_images import SAMPLING_OVERFLOW, VALIDATION_OVERFLOW
from finetune.sampling.pipelines import build_pipeline, generate


@pytest.fixture(scope="module")
def pipeline(tiny_model):
    from finetune.config import ModelConfig

    return build_pipeline(load_base_model(ModelConfig(pretrained=str(tiny_model))))


def test_images_that_decode_to_nan_are_kept_and_said_once_per_call_naming_prompt_and_seeds(pipeline):
    said = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's cast of NaN to pixels is not the word on it
        rows = generate(pipeline, ["a red circle"], 2, 5, 2, 1e30, 64, warn=said.append)
    assert said == [f"2 images of prompt 'a red circle' (seeds 5, 6) decoded to NaN or inf, saved black where not finite: {SAMPLING_OVERFLOW}"]
    assert [image.size for image in rows[0]] == [(64, 64), (64, 64)]


def test_finite_images_are_the_pipelines_own_pixels_and_say_nothing(pipeline):
    import torch

    said = []
    made = generate(pipeline, ["a red circle"], 1, 5, 2, 7.5, 64, warn=said.append)[0][0]
    own = pipeline("a red circle", num_inference_steps=2, guidance_scale=7.5, height=64, width=64, generator=torch.Generator("cpu").manual_seed(5)).images[0]
    assert said == [] and np.array_equal(np.asarray(made), np.asarray(own))


def test_a_validation_grid_of_nan_says_the_run_may_have_diverged_and_training_goes_on(make_recipe, capsys):
    from finetune.training.trainer import train

    recipe = make_recipe(train__max_steps=2, validation__prompts=["a red circle --l 1e30"], validation__images_per_prompt=1,
                         validation__num_inference_steps=2, validation__every_n_steps=1)  # fmt: skip
    result = train(recipe)
    out = capsys.readouterr().out
    assert f"warning: 1 image of prompt 'a red circle' (seed 0) decoded to NaN or inf, saved black where not finite: {VALIDATION_OVERFLOW}" in out
    assert (result.output_dir / "samples" / "step-000002.png").is_file() and (result.output_dir / "pytorch_lora_weights.safetensors").is_file()


def test_the_demo_says_the_line_in_its_status_text(tiny_model, tmp_path, capsys):
    from finetune.demo.engine import DemoEngine, Request

    (tmp_path / "adapters").mkdir()
    images, _, _, status = DemoEngine(str(tiny_model), tmp_path / "adapters").render(Request(prompt="a red circle", steps=2, guidance=1e30, seed=3))
    line = f"1 image of prompt 'a red circle' (seed 3) decoded to NaN or inf, saved black where not finite: {SAMPLING_OVERFLOW}"
    assert f"; warning: {line}" in status and f"warning: {line}\n" in capsys.readouterr().out
    assert images[0][0].size == (64, 64)


def test_the_line_is_said_over_samples_denoising_bar_not_after_it(pipeline, monkeypatch):
    """`finetune sample` draws its bar on the terminal while the line is said: printed, the line went on after the bar's text."""
    import io
    import sys

    from finetune.sampling.pipelines import denoising_bar

    terminal = io.StringIO()  # stdout and stderr: one terminal
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    with denoising_bar(pipeline, "sampling", 2):
        generate(pipeline, ["a red circle"], 1, 5, 2, 1e30, 64)
    before, line = terminal.getvalue().split("warning: 1 image of prompt", 1)
    assert "sampling:" in before and before.endswith("\r")  # the bar cleared from its line first, then drawn again below
