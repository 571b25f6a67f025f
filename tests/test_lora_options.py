"""LoRA's optional settings: LoRA+ learning rates (lora.loraplus_*) and LoCon's conv rank (lora.conv_rank)."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
from finetune.errors import FinetuneError
from finetune.formats.kohya import load_lora, to_kohya
from finetune.formats.kohya_metadata import LORAPLUS_KEYS, finetune_metadata_from_kohya
from finetune.formats.model_card import write_model_card
from finetune.training.trainer import train


def test_loraplus_moves_the_up_weights_ratio_times_faster_in_each_group(make_recipe, tmp_path, capsys, monkeypatch):
    """One AdamW step from B = 0 moves each up weight by its group's learning rate (Adam's first step is
    lr x the gradient's sign), so the saved ups show each group's rate: the UNet's and the text encoder's."""
    from accelerate import Accelerator

    logged = []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, log_kwargs=None: logged.append(values))
    largest = {}
    for ratios in ((None, None), (16.0, None), (16.0, 4.0)):
        recipe = make_recipe(
            output_dir=str(tmp_path / str(ratios)), train__max_steps=1, optimizer__lr=1e-3, optimizer__scheduler="constant", optimizer__warmup_steps=0,
            optimizer__weight_decay=0.0, lora__train_text_encoder=True, lora__text_encoder_lr=1e-4,
            lora__loraplus_lr_ratio=ratios[0], lora__loraplus_text_encoder_lr_ratio=ratios[1],
        )  # fmt: skip
        tensors = load_file(train(recipe).output_dir / LORA_WEIGHTS_NAME)
        lora = load_lora(Path(recipe.output_dir) / LORA_WEIGHTS_NAME)
        recorded = {key: value for key, value in lora.metadata.items() if "loraplus" in key}
        assert recorded == {f"finetune.{key}": f"{value:g}" for key, value in zip(LORAPLUS_KEYS, ratios) if value is not None}
        # In the kohya export as sd-scripts' network_args (JSON in ss_network_args), read back on import; in the card.
        kohya_metadata = to_kohya(lora)[1]
        assert json.loads(kohya_metadata.get("ss_network_args", "{}")) == {key[len("finetune."):]: value for key, value in recorded.items()}
        assert {k: v for k, v in finetune_metadata_from_kohya(kohya_metadata).items() if "loraplus" in k} == recorded
        card = write_model_card(lora, Path(recipe.output_dir) / LORA_WEIGHTS_NAME, "diffusers")[0].read_text()
        assert ("| LoRA+ | up weights at 16 x the learning rate |" in card) == (ratios[0] is not None)
        assert ("| LoRA+ (text encoder) | up weights at 4 x its learning rate |" in card) == (ratios[1] is not None)
        for part in ("unet.", "text_encoder."):
            largest[ratios, part] = max(t.abs().max().item() for k, t in tensors.items() if k.startswith(part) and k.endswith("up.weight"))
    expected = {(None, None): (1e-3, 1e-4), (16.0, None): (16e-3, 16e-4), (16.0, 4.0): (16e-3, 4e-4)}
    for ratios, (unet, text_encoder) in expected.items():
        assert largest[ratios, "unet."] == pytest.approx(unet, rel=1e-3) and largest[ratios, "text_encoder."] == pytest.approx(text_encoder, rel=1e-3)
    # Each group's rate is logged by name; train/lr stays the UNet's (down weights') rate.
    rates = {key: value for key, value in logged[-1].items() if key.startswith("train/lr")}
    assert rates == pytest.approx({"train/lr": 1e-3, "train/lr/unet": 1e-3, "train/lr/unet_up": 16e-3, "train/lr/text_encoder": 1e-4, "train/lr/text_encoder_up": 4e-4})
    out = capsys.readouterr().out
    assert "LoRA+ (lora.loraplus_lr_ratio): the up weights learn at 16 x the learning rate" in out
    assert "LoRA+ for the text encoder (lora.loraplus_text_encoder_lr_ratio): its up weights at 4 x its rate" in out
    with pytest.raises(FinetuneError, match=r"lora.loraplus_lr_ratio sets a LoRA's learning rates, and method full trains none"):
        make_recipe(method="full", lora__loraplus_lr_ratio=16)
    with pytest.raises(FinetuneError, match=r"lora.loraplus_text_encoder_lr_ratio is the text encoder's LoRA\+ ratio, and no text encoder trains"):
        make_recipe(lora__loraplus_text_encoder_lr_ratio=4)
    with pytest.raises(FinetuneError, match=r"lora.loraplus_text_encoder_lr_ratio with prodigy: it takes one optimizer.lr for every parameter"):
        make_recipe(optimizer__name="prodigy", optimizer__lr=1.0, lora__loraplus_text_encoder_lr_ratio=4)


@pytest.mark.parametrize(("key", "value", "does"), [("loraplus_lr_ratio", 16, "sets a LoRA's learning rates"), ("init_from", "lora.safetensors", "starts a LoRA")])
def test_lora_settings_under_a_full_dreambooth_name_its_lora_adapter(make_recipe, image_folder, key, value, does):
    concepts = [{"instance_dir": str(image_folder), "instance_prompt": "a sks shape"}]
    with pytest.raises(FinetuneError, match=rf"^recipe: lora.{key} {does}, and method dreambooth trains none: "
                                            r"remove it \(or use dreambooth.adapter: lora\)$"):  # as lora.rank says; not "use method lora"
        make_recipe(method="dreambooth", data__image_dir=None, dreambooth={"concepts": concepts, "prior_preservation": False}, **{f"lora__{key}": value})


def test_conv_rank_settings_are_checked_and_keep_the_scale(make_recipe):
    from finetune.config import LoRAConfig

    assert LoRAConfig(rank=16, alpha=8, conv_rank=4).conv_rank_alpha() == (4, 2.0)  # alpha/rank kept: 8/16 = 2/4
    assert LoRAConfig(rank=16, alpha=8, conv_rank=4, use_rslora=True).conv_rank_alpha() == (4, 4.0)  # alpha/sqrt(rank): 8/4 = 4/2
    assert LoRAConfig(rank=16, alpha=8, conv_rank=4, conv_alpha=1).conv_rank_alpha() == (4, 1.0)
    assert LoRAConfig(rank=16, alpha=8).conv_rank_alpha() == (16, 8.0)
    with pytest.raises(FinetuneError, match=r"lora.conv_alpha scales the 3x3 conv layers' LoRA, which lora.conv_rank sets: set conv_rank too"):
        make_recipe(lora__conv_alpha=2)
    with pytest.raises(FinetuneError, match=r"lora.conv_rank shapes a LoRA, and method full trains none: remove it"):
        make_recipe(method="full", lora__conv_rank=2)
    with pytest.raises(FinetuneError, match=r"^lora.conv_rank sets the rank of the 3x3 conv layers, and lora.target_modules adapts none: add conv1 and conv2"):
        train(make_recipe(lora__conv_rank=2))  # the attention layers only


def test_lora_layers_keep_their_half_precision_input_under_autocast():
    """peft casts a LoRA layer's bf16 input to its fp32 weights, and autocast casts it back for the
    matmul: finetune turns that cast off. Same loss and gradients to the bit, fewer copies."""

    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer
    from operation_counts import CountOperations
    from test_lora_unit_scale import lora_unet  # the tiny UNet with LoRAs of random weights, and inputs

    unet, inputs = lora_unet(alpha=4, weight_dtype=torch.bfloat16)
    layers = [module for module in unet.modules() if isinstance(module, BaseTunerLayer)]

    def step(cast_inputs: bool):
        for layer in layers:
            layer.cast_input_dtype_enabled = cast_inputs
        unet.zero_grad(set_to_none=True)
        with CountOperations() as operations:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = unet(*inputs).sample.float().pow(2).mean()
            loss.backward()
        return loss.item(), [p.grad.clone() for p in unet.parameters() if p.requires_grad], operations.counts[torch.ops.aten._to_copy]

    assert all(not layer.cast_input_dtype_enabled for layer in layers)  # as add_lora leaves them
    ours, peft_default = step(cast_inputs=False), step(cast_inputs=True)
    assert ours[0] == peft_default[0]
    assert all(torch.equal(a, b) for a, b in zip(ours[1], peft_default[1]))
    assert ours[2] < peft_default[2] - len(layers)  # at least one copy fewer per layer, forward and backward


def test_a_rank_past_every_adapted_layer_is_refused_before_peft_allocates():
    """lora.rank: 1000000 allocated a million-row matrix per layer after the model loaded: a LoRA's up @ down has
    at most the rank min(in, out) of its layer, so a rank above every adapted layer's only adds weights that change
    nothing. A rank that only the wider layers can use is kept (SD1.5's attention is 320 to 1280 wide). The tiny
    UNet's widest attention and 3x3 convs are 64 wide (its narrowest 32), its text encoder 32; a 3x3 conv's down
    matrix reads in x 3 x 3 inputs."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    from finetune.config import LoRAConfig
    from finetune.methods.lora import add_lora, check_ranks_fit, conv_3x3_targets
    from finetune.models.tiny_model import build_tiny_pipeline

    pipeline = build_tiny_pipeline(seed=3)
    refused = [
        (pipeline.unet, ["to_q", "to_k"], LoRAConfig(rank=1_000_000),
         "lora.rank (1000000) is more than any adapted layer of the UNet2DConditionModel can use (the widest, mid_block.attentions.0.transformer_blocks.0.attn1.to_q: "
         "64 in, 64 out, is updated fully by a LoRA of rank 64): lower lora.rank to at most 64"),
        (pipeline.unet, ["to_q", "conv1"], LoRAConfig(rank=4, conv_rank=65),
         "lora.conv_rank (65) is more than any adapted layer of the UNet2DConditionModel can use (the widest, down_blocks.1.resnets.0.conv1: "
         "288 in, 64 out, is updated fully by a LoRA of rank 64): lower lora.conv_rank to at most 64"),
        (pipeline.text_encoder, ["q_proj"], LoRAConfig(rank=33),
         "lora.rank (33) is more than any adapted layer of the CLIPTextModel can use (the widest, encoder.layers.0.self_attn.q_proj: "
         "32 in, 32 out, is updated fully by a LoRA of rank 32): lower lora.rank to at most 32"),
    ]  # fmt: skip
    def check(model, targets, settings) -> None:  # as LoRAMethod.configure_model checks them, before any add_lora
        check_ranks_fit([(model, targets, conv_3x3_targets(model, targets) if settings.conv_rank is not None else [])], settings)

    for model, targets, settings, said in refused:
        with pytest.raises(FinetuneError) as raised:
            check(model, targets, settings)
        assert str(raised.value) == said
    # Full rank of the widest layers is allowed, though the 32-wide ones take rank 64 no further than 32.
    check(pipeline.unet, ["to_q", "conv1"], LoRAConfig(rank=64, conv_rank=64))
    add_lora(pipeline.unet, ["to_q", "conv1"], torch.float32, LoRAConfig(rank=64, conv_rank=64))
    assert any(isinstance(module, BaseTunerLayer) for module in pipeline.unet.modules())
