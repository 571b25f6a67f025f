"""Every method (LoRA, full-UNet DreamBooth with prior preservation, ControlNet) in the single-process
modes: gradient checkpointing trains the very weights plain training does; channels-last puts every
convolution in NHWC and trains the same weights up to float order; an 8-bit optimizer (which
falls back to torch's AdamW, with a warning, where bitsandbytes cannot run) keeps 8-bit states for the
method's large tensors and trains; bf16 trains, samples (class images, validation) and saves outputs
whose frozen parts are the base's. The multi-process modes: tests/test_distributed.py."""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from finetune.config import OptimizerConfig
from finetune.errors import FinetuneError
from finetune.models.loading import load_base_model
from finetune.optim.optimizers import build_optimizer
from finetune.toyworld.datasets import write_folder
from finetune.training.trainer import train
import finetune.training.trainer as trainer
from conftest import build_recipe
from numerics import bit_identical_on_cpu


@pytest.fixture(scope="module")
def dreambooth_folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dreambooth")
    # A filled class folder: no class images are generated.
    return write_folder(root / "star", 2, seed=11), write_folder(root / "class", 2, seed=1, metadata=False)


def method_recipe_of(build, pairs_folder: Path, dreambooth_folders: tuple[Path, Path], method: str, **overrides):
    """A 2-step recipe of `method` made by `build` (conftest's `make_recipe`, or `build_recipe` bound to a folder)."""
    if method == "dreambooth":
        star, classes = dreambooth_folders
        concept = {"instance_dir": str(star), "instance_prompt": "a sks shape", "class_prompt": "a shape", "class_dir": str(classes)}
        settings = dict(dreambooth={"concepts": [concept], "num_class_images": 2}, data__image_dir=None, train__batch_size=1, optimizer__lr=1e-4)
    elif method == "controlnet":
        settings = dict(data__image_dir=str(pairs_folder))
    else:
        settings = {}
    return build(method=method, train__max_steps=2, **{**settings, **overrides})


@pytest.fixture
def method_recipe(make_recipe, pairs_folder, dreambooth_folders):
    return lambda method, **overrides: method_recipe_of(make_recipe, pairs_folder, dreambooth_folders, method, **overrides)


def recorded_run(recipe) -> SimpleNamespace:
    """`train(recipe)`, and what it did: the blocks it ran under torch's checkpoint (their forward is recomputed in
    the backward), its base model, the optimizer's parameters (trained) and their values before training (initial)."""
    run = SimpleNamespace(recomputed=[])
    checkpoint = torch.utils.checkpoint.checkpoint

    def recording_build_optimizer(config, groups, *args, **kwargs):
        run.trained = [p for group in groups for p in group["params"]]
        run.initial = [p.detach().clone() for p in run.trained]
        return build_optimizer(config, groups, *args, **kwargs)

    def recording_load_base_model(*args, **kwargs):
        run.base = load_base_model(*args, **kwargs)
        return run.base

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.utils.checkpoint, "checkpoint", lambda function, *a, **k: run.recomputed.append(function) or checkpoint(function, *a, **k))
        patch.setattr(trainer, "build_optimizer", recording_build_optimizer)
        patch.setattr(trainer, "load_base_model", recording_load_base_model)
        run.result = train(recipe)
    return run


@pytest.fixture(scope="module")
def plain_run(tiny_model, image_folder, pairs_folder, dreambooth_folders, tmp_path_factory):
    """`plain_run(method)`: the method's plain run (`recorded_run`), trained once for the module; the checkpointing and
    channels-last tests each compare a run of their mode with it (a training run each saved)."""
    root, runs = tmp_path_factory.mktemp("plain"), {}

    def plain(method: str) -> SimpleNamespace:
        if method not in runs:
            build = lambda **overrides: build_recipe(tiny_model, image_folder, root / method, **overrides)  # noqa: E731
            runs[method] = recorded_run(method_recipe_of(build, pairs_folder, dreambooth_folders, method))
        return runs[method]

    return plain


def saved_tensors(output_dir: Path) -> dict[str, torch.Tensor]:
    """Every weight the run saved (adapter file, ControlNet folder or pipeline), by file and name."""
    files = [path for path in output_dir.rglob("*.safetensors") if "checkpoints" not in path.parts]
    assert files, f"nothing saved in {output_dir}"
    return {f"{path.relative_to(output_dir)}:{key}": value for path in files for key, value in load_file(path).items()}


METHODS = ["lora", "dreambooth", "controlnet"]


@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_trains_the_same_weights(method_recipe, plain_run, method, tmp_path):
    plain = plain_run(method)
    assert not plain.recomputed
    checkpointed = recorded_run(method_recipe(method, output_dir=str(tmp_path / "checkpointed"), train__gradient_checkpointing=True))
    assert checkpointed.recomputed
    plain, checkpointed = plain.result, checkpointed.result
    expected, got = saved_tensors(plain.output_dir), saved_tensors(checkpointed.output_dir)
    assert got.keys() == expected.keys()
    if torch.cuda.is_available():  # GPU kernels may sum in another order each time (.ci/gpu-check runs this file)
        assert torch.allclose(torch.tensor(checkpointed.losses), torch.tensor(plain.losses), rtol=1e-3)
        return
    assert checkpointed.losses == plain.losses  # the recomputed forward is the same forward
    assert all(torch.equal(got[key], expected[key]) for key in got)


@bit_identical_on_cpu
@pytest.mark.parametrize("method", METHODS)
def test_channels_last_trains_the_same_weights_in_nhwc(method_recipe, plain_run, method, tmp_path):
    plain_run, nhwc_run = plain_run(method), recorded_run(method_recipe(method, output_dir=str(tmp_path / "nhwc"), train__channels_last=True))

    for run, expected in ((plain_run, False), (nhwc_run, True)):
        convolutions = [m.weight for part in (run.base.unet, run.base.vae) for m in part.modules() if isinstance(m, torch.nn.Conv2d)]
        convolutions += [p for p in run.trained if p.dim() == 4]  # ControlNet's own, or the full UNet's
        assert convolutions and all(w.is_contiguous(memory_format=torch.channels_last) == expected for w in convolutions if w.shape[-1] > 1)
    assert torch.allclose(torch.tensor(nhwc_run.result.losses), torch.tensor(plain_run.result.losses), rtol=1e-4)
    # The same update up to float summation order (NHWC kernels sum in another order), as a whole: Adam
    # moves a weight with a near-zero gradient by about lr either way.
    difference = sum(((a.cpu() - b.cpu()) ** 2).sum() for a, b in zip(nhwc_run.trained, plain_run.trained)) ** 0.5
    update = sum(((a.cpu() - b.cpu()) ** 2).sum() for a, b in zip(plain_run.trained, plain_run.initial)) ** 0.5
    assert update > 0 and difference < 1e-2 * update, (difference, update)


@pytest.mark.parametrize("method", METHODS)
def test_an_8bit_optimizer_trains_every_method_with_8bit_states(method_recipe, method, tmp_path, monkeypatch):
    optimizers = []
    monkeypatch.setattr(trainer, "build_optimizer", lambda *args, **kwargs: optimizers.append(build_optimizer(*args, **kwargs)) or optimizers[-1])
    # Rank 64: the tiny UNet's 64-wide LoRA matrices reach bitsandbytes' 4096 elements for 8-bit states (the other
    # methods train whole layers, and refuse lora settings).
    result = train(method_recipe(method, optimizer__name="adamw8bit", **({"lora__rank": 64} if method == "lora" else {})))
    (optimizer,) = optimizers
    assert type(optimizer).__module__.startswith("bitsandbytes")
    dtypes = [(parameter.numel() >= 4096, optimizer.state[parameter]["state1"].dtype) for parameter in optimizer.state]
    assert (True, torch.uint8) in dtypes
    assert all(dtype == (torch.uint8 if large else torch.float32) for large, dtype in dtypes)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert all(torch.isfinite(t).all() for t in saved_tensors(result.output_dir).values())


def test_8bit_optimizer_falls_back_to_adamw_with_a_warning_where_bitsandbytes_cannot_run(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    parameter = torch.nn.Parameter(torch.zeros(4))
    optimizer = build_optimizer(OptimizerConfig(name="paged_adamw8bit", lr=1e-3), [parameter])
    assert type(optimizer) is torch.optim.AdamW
    said = capsys.readouterr().out
    assert said.startswith("warning: optimizer.name=paged_adamw8bit: bitsandbytes cannot run here")
    assert "falling back to torch AdamW (32-bit states)" in said
    lion_fallback = build_optimizer(OptimizerConfig(name="lion8bit", lr=1e-3), [parameter])
    assert lion_fallback.param_groups[0]["betas"] == (0.9, 0.999)  # AdamW's own, not Lion's (0.9, 0.99)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_trains_samples_and_saves_each_method(method_recipe, method, tmp_path):
    validation = dict(validation__prompts=["a shape"], validation__num_inference_steps=2, validation__images_per_prompt=1)
    overrides = dict(train__mixed_precision="bf16", output_dir=str(tmp_path / "run"), **validation)
    if method == "dreambooth":  # class images made by the bf16 text encoder and VAE with the fp32 UNet
        settings = method_recipe(method).dreambooth.model_dump()
        settings["concepts"][0]["class_dir"] = str(tmp_path / "class")
        overrides["dreambooth"] = {**settings, "class_generation": {"num_inference_steps": 2, "batch_size": 1}}
    recipe = method_recipe(method, **overrides)
    result = train(recipe)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert [path.name for path in result.sample_grids] == ["step-000000.png", "step-000002.png"]
    saved = saved_tensors(result.output_dir)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in saved.values())  # trained in fp32
    if method == "dreambooth":
        assert len(list((tmp_path / "class").glob("*.png"))) == 2
        # The output pipeline's frozen parts are the base's own, not their bf16 roundings.
        output = StableDiffusionPipeline.from_pretrained(result.output_dir / "pipeline")
        source = StableDiffusionPipeline.from_pretrained(recipe.model.pretrained)
        for part in ("vae", "text_encoder"):
            expected = getattr(source, part).state_dict()
            assert all(torch.equal(tensor, expected[key]) for key, tensor in getattr(output, part).state_dict().items()), part


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs on a GPU")
def test_fp16_on_a_cpu_stops_with_one_line_before_loading_the_model(make_recipe, monkeypatch):
    monkeypatch.setattr(trainer, "load_base_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(FinetuneError, match="train.mixed_precision fp16 needs a GPU; on a CPU use bf16 or no"):
        train(make_recipe(train__mixed_precision="fp16"))


def test_bf16_on_a_gpu_without_it_stops_with_one_line_before_loading_the_model(make_recipe, monkeypatch):
    """torch and accelerate accept bf16 on a GPU before Ampere (a T4, as free notebooks give) and emulate it."""
    monkeypatch.setattr(trainer, "load_base_model", lambda *a, **k: pytest.fail("loaded the model"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(FinetuneError, match=r"^train.mixed_precision bf16: this GPU \(Tesla T4, compute capability 7.5\) has no bf16 arithmetic "
                                            r"\(NVIDIA's came with Ampere, 8.0\) and would emulate it, far slower: set train.mixed_precision: fp16$"):
        train(make_recipe(train__mixed_precision="bf16"))

    class PastTheCheck(Exception):
        pass

    def accelerator(**options):
        raise PastTheCheck

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100: the run goes on
    monkeypatch.setattr(trainer, "Accelerator", accelerator)
    with pytest.raises(PastTheCheck):
        train(make_recipe(train__mixed_precision="bf16"))


@pytest.mark.parametrize("method", METHODS)
def test_validation_samples_with_the_negative_prompt(method_recipe, method):
    """validation.negative_prompt replaces the unconditional prompt of every validation image (not of the first only)."""
    from finetune.methods import METHODS as METHOD_CLASSES

    images = {}
    for negative in (None, "a blue square"):
        recipe = method_recipe(method, validation__prompts=["a red circle"], validation__num_inference_steps=2, validation__images_per_prompt=2,
                               validation__guidance_scale=5.0, validation__negative_prompt=negative)  # fmt: skip
        chosen = METHOD_CLASSES[recipe.method](recipe)
        chosen.check_data()
        torch.manual_seed(recipe.seed)
        chosen.setup(load_base_model(recipe.model))
        rows, _ = chosen.validation_images(chosen.trained_modules())
        images[negative] = [torch.tensor(np.asarray(image), dtype=torch.float32) for image in rows[0][-2:]]  # getdata(): gone in Pillow 14
    assert all(not torch.equal(a, b) for a, b in zip(images[None], images["a blue square"]))


def test_the_clipped_parameters_are_gathered_once_not_every_step(make_recipe, monkeypatch, tmp_path):
    """Gathering them walks every module of the UNet: a few milliseconds of CPU each step, which a GPU step
    at a small batch waits on. The list does not change during a run."""
    from finetune.methods.lora import LoRAMethod

    calls, gather = [], LoRAMethod.trainable_parameters
    monkeypatch.setattr(LoRAMethod, "trainable_parameters", lambda self: calls.append(1) or gather(self))
    counts = []
    for steps in (2, 6):
        calls.clear()
        trainer.train(make_recipe(output_dir=str(tmp_path / str(steps)), train__max_steps=steps, train__max_grad_norm=1.0, validation__prompts=[]))
        counts.append(len(calls))
    assert counts[0] == counts[1] and counts[0] <= 2, counts
