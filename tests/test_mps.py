"""Apple's MPS device, simulated on a machine without one: what the trainer, `sample` and the demo do where
`torch.backends.mps.is_available()`. Tensors cannot be put on an MPS device here: the calls that would are recorded."""

import pytest
import torch

from finetune.errors import FinetuneError
from finetune.sampling.placement import inference_placement
from finetune.training.device_copy import to_device
from finetune.training.trainer import train
import finetune.training.trainer as trainer


def test_copies_to_mps_wait_for_their_source(monkeypatch):
    """A non_blocking copy from pageable CPU memory to MPS may read its source after it is freed, as each step's
    noise, pixels and latents are at once (pytorch/pytorch#139550, #189690): silently other values."""
    copies = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *args, **kwargs: copies.append(kwargs) or self)
    to_device(torch.zeros(2), torch.device("mps"))
    to_device(torch.zeros(2), "mps", torch.float16)
    assert [copy["non_blocking"] for copy in copies] == [False, False]


def a_mac(monkeypatch, macos: tuple[int, int]) -> None:
    """MPS available (no CUDA), on this macOS version."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos >= (major, minor))


def test_bf16_before_macos_14_stops_with_one_line_before_loading_the_model(make_recipe, monkeypatch):
    """recipes/lora.yaml trains in bf16, which MPS has from macOS 14 on: accelerate stopped the run with "bf16 mixed
    precision requires PyTorch >= 1.10 and a supported device", after the data check."""
    monkeypatch.setattr(trainer, "load_base_model", lambda *a, **k: pytest.fail("loaded the model"))
    a_mac(monkeypatch, (13, 6))
    with pytest.raises(FinetuneError, match=r"^train.mixed_precision bf16: Apple's MPS has bf16 from macOS 14 on, and this Mac runs an older "
                                            r"macOS: set train.mixed_precision: fp16 \(or no\), or update macOS$"):
        train(make_recipe(train__mixed_precision="bf16"))
    with pytest.raises(FinetuneError, match=r"^--precision bf16: Apple's MPS has bf16 from macOS 14 on"):
        inference_placement("auto", "bf16")
    assert inference_placement() == (torch.device("mps"), torch.float32)

    class PastTheCheck(Exception):
        pass

    def accelerator(**options):
        raise PastTheCheck

    monkeypatch.setattr(trainer, "Accelerator", accelerator)
    for macos, environment in [((14, 0), {}), ((13, 6), {"ACCELERATE_USE_CPU": "true"})]:  # bf16 on the Mac's MPS, or on its CPU
        a_mac(monkeypatch, macos)
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(PastTheCheck):
            train(make_recipe(train__mixed_precision="bf16"))



def test_a_launch_on_the_cpu_of_a_machine_with_a_gpu_is_checked_for_the_cpu(make_recipe, monkeypatch):
    """`accelerate launch --cpu` (ACCELERATE_USE_CPU), or several processes without CUDA (joined over gloo on the CPU),
    trains on the CPU whatever GPU the machine has. fp16 went past the check because the machine had one, to fail in
    the model (fp16 weights meeting fp32 inputs, accelerate's autocast being off on the CPU); bf16 was refused for the
    GPU's want of it (a Mac before macOS 14, a T4), with advice to use fp16, which the CPU cannot run."""
    import finetune.distributed.processes as distributed

    class PastTheCheck(Exception):
        pass

    def accelerator(**options):
        raise PastTheCheck

    monkeypatch.setattr(trainer, "load_base_model", lambda *a, **k: pytest.fail("loaded the model"))
    monkeypatch.setattr(trainer, "Accelerator", accelerator)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    a_mac(monkeypatch, (13, 6))
    with pytest.raises(FinetuneError, match=r"^train.mixed_precision fp16 needs a GPU \(this launch runs it on the CPU\); on a CPU use bf16 or no$"):
        train(make_recipe(train__mixed_precision="fp16"))
    with pytest.raises(PastTheCheck):
        train(make_recipe(train__mixed_precision="bf16"))
    monkeypatch.setattr(distributed, "bf16_emulated", lambda: "this GPU (Tesla T4, compute capability 7.5) has no bf16 arithmetic")
    with pytest.raises(PastTheCheck):
        train(make_recipe(train__mixed_precision="bf16"))
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    assert distributed.launch_problem("bf16").startswith("train.mixed_precision bf16: this GPU (Tesla T4")  # on the GPU, as before
    monkeypatch.setenv("WORLD_SIZE", "2")  # two processes of a Mac (no CUDA): accelerate is told to use the CPU
    assert distributed.accelerator_options() == {"cpu": True}
    assert distributed.launch_problem("bf16") is None and "this launch runs it on the CPU" in distributed.launch_problem("fp16")


# What torch's MPS allocator raises (a RuntimeError, not torch.OutOfMemoryError as on CUDA).
MPS_OUT_OF_MEMORY = ("MPS backend out of memory (MPS allocated: 9.00 GiB, other allocations: 464.00 KiB, max allowed: 9.07 GiB). "
                     "Tried to allocate 1024.00 MiB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper limit")


def test_sampling_out_of_mps_memory_is_made_in_halves(monkeypatch, capsys):
    """Validation grids, `finetune sample` and the demo remake a batch that ran out of GPU memory in halves: on a Mac the
    error went through, and a validation grid too large for its memory stopped the run."""
    import finetune.sampling.pipelines as sampling

    monkeypatch.setattr(sampling, "PIXELS_PER_CALL", 4 * 64 * 64)
    tried = []

    def fits_one(batch):
        tried.append(len(batch))
        if len(batch) > 1:
            raise RuntimeError(MPS_OUT_OF_MEMORY)
        return [f"image {batch[0]}"]

    assert sampling._in_batches_that_fit(fits_one, [0, 1, 2, 3], 64 * 64) == {k: f"image {k}" for k in range(4)}
    assert tried == [4, 2, 1, 1, 1, 1] and "4 images at once ran out of GPU memory; making 2 at a time" in capsys.readouterr().out

    def broken(batch):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):  # any other error is raised at once, not halved
        sampling._in_batches_that_fit(broken, [0, 1], 64 * 64)


def test_class_images_out_of_mps_memory_are_made_in_halves(tiny_model, tmp_path, monkeypatch):
    from finetune.config import ClassImageGeneration, ModelConfig
    import finetune.dreambooth.class_images as class_images
    from finetune.models.loading import load_base_model
    from finetune.sampling.pipelines import build_pipeline

    real_make, tried = class_images._make, []

    def on_a_small_mac(pipeline, prompts, batch, *args):
        tried.append(len(batch))
        if len(batch) > 2:
            raise RuntimeError(MPS_OUT_OF_MEMORY)
        return real_make(pipeline, prompts, batch, *args)

    monkeypatch.setattr(class_images, "_make", on_a_small_mac)
    pipeline = build_pipeline(load_base_model(ModelConfig(pretrained=str(tiny_model))))
    settings = ClassImageGeneration(num_inference_steps=2, batch_size=8, seed=5)
    assert class_images.generate_class_images(pipeline, ["a shape"], tmp_path, "k", [0, 1, 2, 3, 4], settings, 64) == 5
    assert tried == [5, 2, 2, 1]


def test_sample_out_of_mps_memory_is_one_line(tiny_model, tmp_path, monkeypatch, capsys):
    from finetune.cli.main import main
    import finetune.sampling.inference

    def out_of_memory(*args, **kwargs):
        raise RuntimeError(MPS_OUT_OF_MEMORY)

    monkeypatch.setattr(finetune.sampling.inference, "generate_with_settings", out_of_memory)
    assert main(["sample", "--base", str(tiny_model), "--prompt", "a", "--resolution", "2048", "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err.strip().endswith("error: out of memory sampling 2048x2048 px images: lower --resolution (this model's own is 64)")


def test_8bit_optimizers_fall_back_to_adamw_on_mps_said_before_the_data_check(image_folder, tmp_path, monkeypatch, capsys):
    """bitsandbytes installs on a Mac but has no 8-bit optimizer step for MPS: recipes/dreambooth.yaml's adamw8bit was built,
    and the run failed at its first step, once the model had loaded. Now torch's AdamW, said once, before the data check."""
    import sys

    import yaml
    from conftest import SHIPPED_BASE

    from finetune.cli.main import main
    import finetune.cli.train_command
    from finetune.config import OptimizerConfig
    import finetune.data_check.train_inputs
    from finetune.optim.optimizers import build_optimizer

    a_mac(monkeypatch, (14, 0))
    monkeypatch.setattr(sys, "platform", "darwin")
    said, built = {}, []

    def data_check(recipe, resume_from=None):
        said["before the data check"] = capsys.readouterr().out

    def training(recipe, args, base_location):  # train() as far as its optimizer, on the Mac's MPS, within the command
        built.append(build_optimizer(recipe.optimizer, [torch.nn.Parameter(torch.zeros(4096))], torch.device("mps")))
        said["by train()"] = capsys.readouterr().out
        raise FinetuneError("stopped here by the test")

    monkeypatch.setattr(finetune.data_check.train_inputs, "check_data_first", data_check)
    monkeypatch.setattr(finetune.cli.train_command, "_run_training", training)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"pretrained": str(SHIPPED_BASE)}, "output_dir": str(tmp_path / "run"), "optimizer": {"name": "adamw8bit"},
                                      "data": {"image_dir": str(image_folder), "resolution": 64}, "validation": {"prompts": []}}))  # fmt: skip
    import bitsandbytes

    fallback = ("warning: optimizer.name=adamw8bit: bitsandbytes has no 8-bit optimizer step for Apple's MPS; "
                "falling back to torch AdamW (32-bit states)")  # fmt: skip
    for installed in (True, False):  # pyproject.toml leaves it out on macOS; installed by hand, it has no MPS step either
        if not installed:
            monkeypatch.setitem(sys.modules, "bitsandbytes", None)
        assert main(["train", str(recipe)]) == 2
        assert said["before the data check"].count(fallback) == 1, said  # not "pip install bitsandbytes": no help there
        assert "bitsandbytes" not in said["by train()"], said
        assert type(built.pop()) is torch.optim.AdamW
    monkeypatch.setitem(sys.modules, "bitsandbytes", bitsandbytes)
    lion = build_optimizer(OptimizerConfig(name="lion8bit", lr=1e-4), [torch.nn.Parameter(torch.zeros(4096))], torch.device("mps"))
    assert type(lion) is torch.optim.AdamW and lion.param_groups[0]["betas"] == (0.9, 0.999)  # AdamW's betas, not Lion's own
    cpu = build_optimizer(OptimizerConfig(name="adamw8bit", lr=1e-4), [torch.nn.Parameter(torch.zeros(4096))], torch.device("cpu"))
    assert type(cpu) is bitsandbytes.optim.AdamW8bit  # the Mac's CPU (accelerate launch --cpu) steps it
