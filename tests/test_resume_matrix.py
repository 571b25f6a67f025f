"""A resumed run continues the same curve: for each method, with the features that keep state, a run stopped by
Ctrl-C and resumed with --resume latest ends as a run never stopped (its outputs, bit for bit on a CPU, and its
last checkpoint's optimizer state), and logs the same values at the same steps (TensorBoard's scalars, as
`Accelerator.log` receives them), the same validation losses and the same sample grids.

The stop lands where continuing is hardest: between two log steps (logging.every_n_steps: 2, stopped at step 3,
which the first log after the resume must include), on a validation step, within an epoch, after a warm-up,
with augmentation, accumulation, a weight average and caches running. A wider matrix run by hand (every method;
caches in memory and on disk, loss options, max_norm, the 8-bit optimizers, Prodigy, Adafactor, keep_last
rotation, epochs and buckets, loader workers, a stop inside an accumulation window, two stops, a SIGTERM to the
process group of `finetune train`) matched once these cases did: they are the ones that found a defect.
"""

import os
import signal

import pytest
import torch
from accelerate import Accelerator
from numerics import bit_identical_on_cpu
from safetensors.torch import load_file

from finetune.checkpoints.run_files import METADATA_FILE
from finetune.training.trainer import train

# Stopped at 3 of 6 with a log every 2 steps: the log at step 4 must be the mean of steps 3 and 4, across the stop.
COMMON = dict(train__max_steps=6, logging__every_n_steps=2, optimizer__scheduler="cosine", optimizer__warmup_steps=2)
# Due at the stop's step 3, which a stop skips: the resumed run draws it (the grid and the held-out loss).
VALIDATION = dict(validation__prompts=["a red circle"], validation__num_inference_steps=2, validation__images_per_prompt=1,
                  validation__at_start=False, validation__every_n_steps=3, validation__loss_images=1)
STAR = {"instance_prompt": "a sks shape", "class_prompt": "a shape"}
CLASS_IMAGES = {"num_class_images": 2, "class_generation": {"num_inference_steps": 2, "batch_size": 2}}
CASES = {
    "lora-augmented-accumulated-average": dict(
        train__gradient_accumulation_steps=2, train__ema_decay=0.8,
        data__caption_dropout=0.3, data__random_flip=True, data__crop="random", **VALIDATION),
    "lora-text-encoder-cached-latents-max-norm-lion8bit": dict(
        optimizer__name="lion8bit", lora__train_text_encoder=True, train__cache_latents=True, lora__max_norm=0.01,
        train__noise_offset=0.1, train__snr_gamma=5.0),
    # DoRA's magnitudes are weights, optimizer state and averages of their own, on attention and 3x3 convolutions, with LoRA+.
    "lora-dora-conv-text-encoder-loraplus-average": dict(
        lora__use_dora=True, lora__target_modules=["to_q", "to_v", "conv1"], lora__train_text_encoder=True, lora__loraplus_lr_ratio=4.0,
        train__ema_decay=0.8),
    "dreambooth-lora-prior-preservation": dict(
        method="dreambooth", data__image_dir=None, train__batch_size=1, dreambooth={"adapter": "lora", **CLASS_IMAGES}),
    "dreambooth-full-unet-average-text-cache-on-disk": dict(  # the resumed run finds every caption's encoding on disk
        method="dreambooth", data__image_dir=None, train__batch_size=1, train__ema_decay=0.8, train__cache_text_embeddings=True,
        dreambooth={"adapter": "full", "prior_preservation": False}),
    "controlnet-accumulated": dict(method="controlnet", train__gradient_accumulation_steps=2, data__random_flip=True),
}
SLOW = pytest.mark.slow(reason="about 10 s each: a DreamBooth or ControlNet set of three runs")


def _run(recipe, monkeypatch, resume=None, stop_at=None):
    """The run's result and what it logged, by step; a Ctrl-C after step `stop_at` (the run saves and stops there)."""
    logged = {}

    def on_step(step):
        if step == stop_at:
            os.kill(os.getpid(), signal.SIGINT)  # caught by the run (finetune.distributed.stopping), as a terminal's Ctrl-C

    log = lambda self, values, step=None, log_kwargs=None: logged.setdefault(step, {}).update(values)  # noqa: E731
    monkeypatch.setattr(Accelerator, "log", log)
    result = train(recipe, resume=resume, on_step=on_step)
    return result, logged


def _same(a, b) -> bool:
    """Equal nested optimizer states: tensors bit for bit, settings by value."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _weights(path):
    files = [path] if path.is_file() else sorted(path.rglob("*.safetensors"))
    return {f"{file.name}:{key}": value for file in files for key, value in load_file(file).items()}


@bit_identical_on_cpu
@pytest.mark.parametrize("case", [pytest.param(name, marks=[SLOW] if name.startswith(("dreambooth", "controlnet")) else []) for name in CASES])
def test_a_run_stopped_and_resumed_ends_and_logs_as_a_run_never_stopped(make_recipe, image_folder, pairs_folder, tmp_path, monkeypatch, case):
    settings = {**COMMON, **CASES[case]}
    if case.startswith("dreambooth"):
        settings["dreambooth"] = {"concepts": [{"instance_dir": str(image_folder), **STAR}], **settings["dreambooth"]}
    if case.startswith("controlnet"):
        settings["data__image_dir"] = str(pairs_folder)
    if settings.get("train__cache_text_embeddings"):
        settings["train__cache_dir"] = str(tmp_path / "cache")
    straight, straight_logs = _run(make_recipe(output_dir=str(tmp_path / "straight"), **settings), monkeypatch)
    stopped, logs = _run(make_recipe(output_dir=str(tmp_path / "stopped"), **settings), monkeypatch, stop_at=3)
    assert stopped.interrupted and stopped.final_step == 3
    resumed, resumed_logs = _run(make_recipe(output_dir=str(tmp_path / "stopped"), **settings), monkeypatch, resume="latest")

    assert stopped.losses + resumed.losses == straight.losses
    assert {**logs, **resumed_logs} == straight_logs and {2, 4, 6} <= straight_logs.keys()
    assert stopped.validation_losses + resumed.validation_losses == straight.validation_losses
    grids = {path.name: path.read_bytes() for path in (straight.output_dir / "samples").glob("*.png")}
    assert {path.name: path.read_bytes() for path in (tmp_path / "stopped" / "samples").glob("*.png")} == grids
    saved = [path.relative_to(straight.output_dir) for path in straight.saved_files]
    assert saved and [path.relative_to(resumed.output_dir) for path in resumed.saved_files] == saved  # none: nothing compared below
    for output in straight.saved_files:
        expected, got = _weights(output), _weights(tmp_path / "stopped" / output.relative_to(straight.output_dir))
        assert got.keys() == expected.keys() and all(torch.equal(got[key], value) for key, value in expected.items()), output.name
        # A pipeline's other files too (its tokenizer's), but for the recipe's hash, which covers output_dir.
        for file in [file for file in output.rglob("*") if file.suffix in (".json", ".txt") and file.name != METADATA_FILE]:
            assert (tmp_path / "stopped" / file.relative_to(straight.output_dir)).read_bytes() == file.read_bytes(), file.name
    # The last checkpoint continues alike too (a longer run resumed from either): its optimizer's state and settings.
    last = [run / "checkpoints" / "checkpoint-6" / "optimizer.bin" for run in (straight.output_dir, tmp_path / "stopped")]
    expected, got = (torch.load(path, weights_only=False) for path in last)
    assert _same(got["param_groups"], expected["param_groups"]) and _same(got["state"], expected["state"])
