"""Apple's MPS device, simulated on a machine without one: what the trainer, `sample` and the demo do where
`torch.backends.mps.is_available()`. Tensors cannot be put on an MPS device here: the calls that would are recorded."""

import pytest
import torch

import finetune.trainer as trainer
from finetune.device_copy import to_device
from finetune.errors import FinetuneError
from finetune.placement import inference_placement
from finetune.trainer import train


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
