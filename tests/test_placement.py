"""Where sample, eval and the demo run: the GPU in fp16 when there is one, the CPU in fp32 otherwise,
and --device/--precision as asked (finetune/sampling/placement.py)."""

import numpy as np
import pytest
import torch

from finetune.cli.main import main
from finetune.demo.engine import DemoEngine, Request
from finetune.errors import FinetuneError
import finetune.sampling.inference as inference
from finetune.sampling.placement import inference_placement, without_tf32


def test_auto_is_the_gpu_in_fp16_when_there_is_one_and_the_cpu_in_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert inference_placement() == (torch.device("cpu"), torch.float32)
    assert inference_placement("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(FinetuneError, match=r"^--device cuda: torch sees no CUDA GPU here"):
        inference_placement("cuda")
    with pytest.raises(FinetuneError, match=r"^--precision fp16 needs a GPU: on a CPU use fp32 or bf16$"):
        inference_placement("auto", "fp16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert inference_placement() == (torch.device("cuda"), torch.float16)
    assert inference_placement("auto", "fp32") == (torch.device("cuda"), torch.float32)
    assert inference_placement("cpu") == (torch.device("cpu"), torch.float32)  # a GPU busy training: sample on the CPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)  # a T4
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(FinetuneError, match=r"^--precision bf16: this GPU \(Tesla T4, compute capability 7.5\) has no bf16 .* leave --precision out \(fp16\)$"):
        inference_placement("auto", "bf16")


def test_sample_runs_in_the_precision_asked_and_says_where(tiny_model, tmp_path, monkeypatch, capsys):
    dtypes = []
    generate = inference.generate_with_settings

    def recording(pipeline, *args, **kwargs):
        dtypes.append({part: getattr(pipeline, part).dtype for part in ("unet", "vae", "text_encoder")})
        return generate(pipeline, *args, **kwargs)

    monkeypatch.setattr(inference, "generate_with_settings", recording)
    arguments = ["sample", "--base", str(tiny_model), "--prompt", "a red circle", "--num-images", "1", "--steps", "2", "--device", "cpu"]
    assert main([*arguments, "--precision", "bf16", "--out", str(tmp_path / "bf16")]) == 0
    assert "sampling on cpu in bf16" in capsys.readouterr().out
    assert dtypes.pop() == {"unet": torch.bfloat16, "vae": torch.bfloat16, "text_encoder": torch.bfloat16}
    assert (tmp_path / "bf16" / "00000-prompt0_seed0.png").is_file()
    assert main([*arguments, "--out", str(tmp_path / "fp32")]) == 0
    assert "sampling on cpu in fp32" in capsys.readouterr().out and set(dtypes.pop().values()) == {torch.float32}

    assert main([*arguments[:-2], "--precision", "fp16", "--out", str(tmp_path / "fp16")]) == 2
    assert capsys.readouterr().err.strip() == "error: --precision fp16 needs a GPU: on a CPU use fp32 or bf16"
    assert not dtypes  # refused before the model loaded


def test_the_demo_renders_in_the_precision_asked_and_gives_the_base_weights_back(tiny_model, adapters_dir):
    engine = DemoEngine(str(tiny_model), adapters_dir, device="cpu", precision="bf16")
    assert {engine.base.unet.dtype, engine.base.vae.dtype, engine.base.text_encoder.dtype} == {torch.bfloat16}
    before = {name: tensor.clone() for name, tensor in engine.base.unet.state_dict().items()}
    images, labels, _, _ = engine.render(Request(prompt="a red circle", steps=2, loras=[("trained", 1.0)], rows=1))
    assert labels == ["base", "trained x1"] and len(images[0]) == 2
    assert not np.array_equal(np.asarray(images[0][0]), np.asarray(images[0][1]))  # the LoRA, applied to bf16 weights, changes the image
    assert all(torch.equal(tensor, before[name]) for name, tensor in engine.base.unet.state_dict().items())


def test_training_sets_tf32_for_convolutions_as_for_matmuls_and_eval_turns_both_off(make_recipe, monkeypatch, tmp_path):
    """cuDNN's TF32 switch is on by default: `train.allow_tf32: false` left a GPU's convolutions in TF32, and
    eval's "fp32, so reports compare across machines" was not fp32 for them."""
    from finetune.models.loading import load_base_model
    import finetune.training.trainer as trainer

    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    saved = flags()
    seen = []
    monkeypatch.setattr(trainer, "load_base_model", lambda *a, **k: seen.append(flags()) or load_base_model(*a, **k))
    try:
        torch.backends.cudnn.allow_tf32 = True  # torch's default
        for allowed in (False, True):
            trainer.train(make_recipe(output_dir=str(tmp_path / str(allowed)), train__max_steps=1, train__allow_tf32=allowed))
        assert seen == [(False, False), (True, True)]
        with without_tf32():
            assert flags() == (False, False)
        assert flags() == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
