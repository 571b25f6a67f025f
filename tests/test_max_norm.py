"""lora.max_norm (sd-scripts' scale_weight_norms): each layer's update is kept within a norm."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
from finetune.config import LoRAConfig
from finetune.errors import FinetuneError
from finetune.formats.kohya import load_lora, to_kohya
from finetune.formats.model_card import write_model_card
from finetune.methods.lora import add_lora
from finetune.models.loading import load_base_model
from finetune.optim.max_norm import apply_max_norm, lora_layers
from finetune.training.ema import WeightAverage
from finetune.training.trainer import train


def explicit_norm(layer) -> torch.Tensor:
    update = layer.lora_B["default"].weight.flatten(1) @ layer.lora_A["default"].weight.flatten(1)
    return torch.linalg.norm(update) * layer.scaling["default"]


@pytest.mark.parametrize("rslora", [False, True])
def test_update_norms_without_forming_the_update_and_shrinking_only_the_large_ones(make_recipe, rslora):
    recipe = make_recipe()
    unet = load_base_model(recipe.model).unet
    add_lora(unet, ["to_q", "to_out.0", "conv1"], torch.float32, LoRAConfig(rank=4, alpha=2, use_rslora=rslora))
    generator = torch.Generator().manual_seed(0)
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * torch.rand((), generator=generator)
    layers = lora_layers({"unet": unet})
    assert {type(layer.get_base_layer()).__name__ for layer in layers.values()} == {"Linear", "Conv2d"}
    before = {name: explicit_norm(layer) for name, layer in layers.items()}

    ordered = sorted(norm.item() for norm in before.values())
    limit = (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2  # half the layers above it
    weights = {name: (layer.lora_A["default"].weight.clone(), layer.lora_B["default"].weight.clone()) for name, layer in layers.items()}
    logs = apply_max_norm(layers, limit)
    above = {name for name, norm in before.items() if norm > limit}
    assert logs["lora/layers_scaled"] == len(above) > 0 and logs["lora/max_norm"] == pytest.approx(limit, rel=1e-4)
    for name, layer in layers.items():
        if name in above:  # shrunk to the limit, down and up alike (the update keeps its direction)
            assert explicit_norm(layer).item() == pytest.approx(limit, rel=1e-4)
            ratio = layer.lora_A["default"].weight / weights[name][0]
            assert torch.allclose(ratio, ratio.flatten()[0]) and torch.allclose(layer.lora_B["default"].weight, weights[name][1] * ratio.flatten()[0])
        else:
            assert torch.equal(layer.lora_A["default"].weight, weights[name][0]) and torch.equal(layer.lora_B["default"].weight, weights[name][1])


def test_a_run_with_max_norm_keeps_every_layer_within_it_and_logs_it(make_recipe, tmp_path, monkeypatch, capsys):
    logged = []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, log_kwargs=None: logged.append(values))
    settings = dict(train__max_steps=6, optimizer__lr=3e-2, logging__every_n_steps=1, lora__target_modules=["to_q", "to_v", "conv1"])
    free = train(make_recipe(output_dir=str(tmp_path / "free"), **settings))
    capsys.readouterr()
    held = train(make_recipe(output_dir=str(tmp_path / "held"), lora__max_norm=0.05, **settings))
    assert "max-norm (lora.max_norm): each layer's update is kept within 0.05 after every step" in capsys.readouterr().out
    norms = {run: [torch.linalg.norm(layer.delta()).item() for layer in load_lora(result.output_dir / LORA_WEIGHTS_NAME).layers.values()]
             for run, result in (("free", free), ("held", held))}  # fmt: skip
    assert max(norms["free"]) > 0.05  # without it, this learning rate takes layers past the limit
    assert max(norms["held"]) <= 0.05 * (1 + 1e-4)
    scaled = [values["train/lora/layers_scaled"] for values in logged if "train/lora/layers_scaled" in values]
    assert len(scaled) == 6 and scaled[-1] > 0  # logged with the held run's every step
    # Recorded, and in the kohya export as sd-scripts' ss_scale_weight_norms; in the model card.
    lora = load_lora(held.output_dir / LORA_WEIGHTS_NAME)
    assert lora.metadata["finetune.max_norm"] == "0.05" and to_kohya(lora)[1]["ss_scale_weight_norms"] == "0.05"
    assert "| max norm | 0.05 " in write_model_card(lora, held.output_dir / LORA_WEIGHTS_NAME, "diffusers")[0].read_text()
    assert "finetune.max_norm" not in load_lora(free.output_dir / LORA_WEIGHTS_NAME).metadata


def test_max_norm_needs_a_lora(make_recipe):
    with pytest.raises(FinetuneError, match=r"lora.max_norm shapes a LoRA, and method full trains none: remove it"):
        make_recipe(method="full", lora__max_norm=1.0)


def test_the_weight_average_is_held_within_max_norm_where_it_samples_and_saves(make_recipe, tmp_path, monkeypatch):
    """The average of the down and of the up weights, each taken apart, need not keep their product within the
    limit every step kept; forced past it here (the up weights' averages x 10), the saved LoRA is still within."""
    update = WeightAverage.update

    def update_past_the_limit(self):
        update(self)
        for name, average in self.averages.items():
            if "lora_B" in name:
                average.mul_(10.0)

    monkeypatch.setattr(WeightAverage, "update", update_past_the_limit)
    settings = dict(train__max_steps=3, train__ema_decay=0.5, lora__target_modules=["to_q", "to_v"], lora__max_norm=0.05)
    held = train(make_recipe(output_dir=str(tmp_path / "held"), **settings))
    norms = [torch.linalg.norm(layer.delta()).item() for layer in load_lora(held.output_dir / LORA_WEIGHTS_NAME).layers.values()]
    assert max(norms) == pytest.approx(0.05, rel=1e-3)  # past it before being held (x 10 on the up weights)


def test_max_norm_works_on_the_layers_of_one_shape_at_once(make_recipe):
    """About 9 kernels a layer, each launched alone, were some 1,150 launches per step for SD1.5's 128 attention LoRAs
    (of a GPU step that waits on its launches: docs/benchmarks-gpu.md); stacked by shape, a couple of dozen per shape."""
    from torch.utils._python_dispatch import TorchDispatchMode

    views = {"view", "_unsafe_view", "unbind", "t", "transpose", "expand", "detach", "alias", "slice", "select", "unsqueeze", "lift_fresh"}

    class CountKernels(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func._overloadpacket.__name__ not in views
            return func(*args, **(kwargs or {}))

    unet = load_base_model(make_recipe().model).unet
    add_lora(unet, ["to_q", "to_k", "to_v", "to_out.0"], torch.float32, LoRAConfig(rank=4, alpha=2))
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_()
    layers = lora_layers({"unet": unet})
    groups = {(layer.lora_A["default"].weight.shape, layer.lora_B["default"].weight.shape) for layer in layers.values()}
    assert len(layers) == 32 and len(groups) == 3  # two widths, and cross-attention reading the text at a third shape
    with CountKernels() as counted:
        apply_max_norm(layers, 0.01)
    assert counted.count <= 25 * len(groups) < 3 * len(layers), counted.count
    assert all(explicit_norm(layer).item() == pytest.approx(0.01, rel=1e-4) for layer in layers.values())
