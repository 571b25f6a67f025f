"""LoRA end to end on the tiny model: it learns, touches nothing else, saves what diffusers loads,
and resumes bit for bit."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from finetune.checkpoints.run_files import list_checkpoints
from finetune.data.items import CaptionedImageDataset, collate
from data_examples import load_examples
from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
from finetune.errors import FinetuneError
from finetune.formats.kohya import load_lora, save_lora_file, to_kohya
from finetune.formats.model_card import write_model_card
from finetune.methods.lora import LoRAMethod
from finetune.models.encoders import encode_prompts, latents_from_moments, posterior_moments
from finetune.models.loading import load_base_model
from finetune.training.diffusion import add_noise, per_sample_loss
from finetune.training.trainer import train
from numerics import bit_identical_on_cpu


def fixed_batch_loss(base, unet, recipe) -> float:
    """The loss on the whole tiny dataset with fixed noise and timesteps: comparable across models."""
    examples = load_examples(recipe.data)
    batch = collate([CaptionedImageDataset(examples, recipe.data, seed=0)[(i, 0)] for i in range(len(examples))])
    generator = torch.Generator().manual_seed(1234)
    latents = latents_from_moments(base.vae, posterior_moments(base.vae, batch["pixel_values"]))  # the posterior means
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.linspace(50, 950, len(examples)).long()
    noised = add_noise(base.noise_scheduler, latents, noise, timesteps)
    text = encode_prompts(base.tokenizer, base.text_encoder, batch["captions"])
    with torch.no_grad():
        prediction = unet(noised.noisy_latents, timesteps, text).sample
    return per_sample_loss(prediction, noised, base.noise_scheduler).mean().item()


def unet_output(unet, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 700]), text).sample


def lora_model(recipe, lora_file: Path | None = None):
    """The base model with the recipe's LoRA attached (and loaded from our own output file)."""
    base = load_base_model(recipe.model)
    LoRAMethod(recipe).setup(base)
    if lora_file is not None:
        pipeline = StableDiffusionPipeline.from_pretrained(recipe.model.pretrained)
        pipeline.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
        return base, pipeline.unet
    return base, base.unet


def test_loss_falls_on_a_fixed_batch(make_recipe):
    recipe = make_recipe(train__max_steps=30, train__batch_size=4, optimizer__lr=1e-2, lora__rank=8, lora__alpha=8)
    base = load_base_model(recipe.model)
    before = fixed_batch_loss(base, base.unet, recipe)
    result = train(recipe)
    _, trained = lora_model(recipe, result.output_dir / LORA_WEIGHTS_NAME)
    after = fixed_batch_loss(base, trained, recipe)
    assert after < 0.85 * before, (before, after)  # measured: 1.146 -> 0.868 (0.76x; 60 steps at 5e-3: 0.71x)


# Attention alone (recipes/lora.yaml), and with the feed-forward, projection and conv layers (the quickstart's).
TARGETS = {"attention": ["to_q", "to_k", "to_v", "to_out.0"],
           "all": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]}


# LoCon: the 3x3 convolutions at their own rank and alpha (lora.conv_rank, conv_alpha).
LOCON = {"lora__conv_rank": 2, "lora__conv_alpha": 3.0}


@pytest.mark.parametrize("targets, conv", [("attention", {}), ("all", {}), ("all", LOCON)], ids=["attention", "all", "locon"])
def test_only_lora_weights_change_and_saved_file_reproduces_the_trained_unet(make_recipe, targets, conv, monkeypatch):
    import finetune.training.trainer as trainer_module

    trained = []
    monkeypatch.setattr(trainer_module, "load_base_model", lambda *a, **k: trained.append(load_base_model(*a, **k)) or trained[-1])
    recipe = make_recipe(train__max_steps=3, lora__rank=4, lora__alpha=2, lora__target_modules=TARGETS[targets], **conv)  # alpha != rank on purpose
    result = train(recipe)
    lora_file = result.output_dir / LORA_WEIGHTS_NAME
    assert result.saved_files == [lora_file]

    # Rebuild the trained UNet exactly: base + LoRA with the saved weights, through peft directly.
    base, unet = lora_model(recipe)
    tensors = load_file(lora_file)
    from peft import set_peft_model_state_dict
    from diffusers.utils import convert_unet_state_dict_to_peft

    set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in tensors.items()}))
    expected = unet_output(unet)
    assert torch.allclose(unet_output(trained[0].unet.eval()), expected, atol=1e-5)  # the UNet as training left it

    # diffusers' own loader, in a fresh pipeline, gives the same output: keys and alpha/rank both right.
    pipeline = StableDiffusionPipeline.from_pretrained(recipe.model.pretrained)
    pipeline.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    assert torch.allclose(unet_output(pipeline.unet), expected, atol=1e-5)
    assert not torch.allclose(unet_output(base.unet.disable_adapters() or base.unet), expected, atol=1e-4)

    # The trained adapter is not a no-op, and every non-LoRA tensor in the file-backed pipeline is the base's.
    fresh, in_pipeline = load_base_model(recipe.model), pipeline.unet.state_dict()
    for name, tensor in fresh.unet.state_dict().items():
        peft_name = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        loaded = in_pipeline.get(name, in_pipeline.get(peft_name))
        assert torch.equal(loaded, tensor), name
    with safe_open(str(lora_file), "pt") as f:
        metadata = f.metadata()
    assert metadata["finetune.rank"] == "4" and metadata["finetune.alpha"] == "2.0"
    assert metadata["finetune.base_model"] == Path(recipe.model.pretrained).name  # by name; the run's base_paths.json says where
    lora = load_lora(lora_file)
    convs = {key for key, layer in lora.layers.items() if layer.is_conv_3x3}
    assert convs == ({key for key in lora.layers if key.endswith(("conv1", "conv2"))} if targets == "all" else set())
    conv_rank, conv_alpha = (2, 3.0) if conv else (4, 2.0)
    assert {(layer.rank, layer.alpha) for key, layer in lora.layers.items() if key in convs} <= {(conv_rank, conv_alpha)}
    assert {(layer.rank, layer.alpha) for key, layer in lora.layers.items() if key not in convs} == {(4, 2.0)}
    kohya_metadata = to_kohya(lora)[1]
    assert (kohya_metadata["ss_network_dim"], kohya_metadata["ss_network_alpha"]) == ("4", "2.0")
    assert json.loads(kohya_metadata.get("ss_network_args", "{}")) == ({"conv_dim": str(conv_rank), "conv_alpha": str(conv_alpha)} if convs else {})
    if conv:  # recorded, in the card, and the kohya layout loads in diffusers as the same model
        assert (metadata["finetune.conv_rank"], metadata["finetune.conv_alpha"]) == ("2", "3.0")
        from types import SimpleNamespace

        from finetune.demo.page import table_row  # the demo's adapter table

        assert table_row(SimpleNamespace(name="r", kind="lora", layout="diffusers", metadata=metadata, refused=None))[5] == "4 (3x3 conv 2)"
        assert "| 3x3 conv layers (LoCon) | rank 2 / alpha 3 (scaled by 1.5) |" in write_model_card(lora, lora_file, "diffusers")[0].read_text()
        kohya_file = save_lora_file(lora, result.output_dir / "kohya" / "locon.safetensors", "kohya")
        webui = StableDiffusionPipeline.from_pretrained(recipe.model.pretrained)
        webui.load_lora_weights(str(kohya_file.parent), weight_name=kohya_file.name)
        assert torch.allclose(unet_output(webui.unet), expected, atol=1e-5)


def test_frozen_parts_are_bit_identical_after_training(make_recipe):
    """Train in-process and compare every non-LoRA tensor of the UNet, VAE and text encoder to a fresh load."""
    recipe = make_recipe(train__max_steps=3)
    import finetune.training.trainer as trainer_module

    captured = {}
    original = trainer_module.load_base_model

    def capture(*args, **kwargs):
        captured["base"] = original(*args, **kwargs)
        return captured["base"]

    trainer_module.load_base_model = capture
    try:
        train(recipe)
    finally:
        trainer_module.load_base_model = original
    trained, fresh = captured["base"], load_base_model(recipe.model)
    changed_lora = 0
    for part in ("vae", "text_encoder"):
        after_training = getattr(trained, part).state_dict()
        for name, tensor in getattr(fresh, part).state_dict().items():
            assert torch.equal(after_training[name].cpu(), tensor), f"{part}.{name}"
    trained_state, fresh_unet = trained.unet.state_dict(), fresh.unet.state_dict()
    for name, tensor in trained_state.items():
        if "lora_" in name:
            changed_lora += 1
            continue
        original_name = name.replace(".base_layer.", ".")
        assert torch.equal(tensor.cpu(), fresh_unet[original_name]), name
    assert changed_lora > 0
    assert all(not p.requires_grad for p in trained.vae.parameters())
    assert all(not p.requires_grad for p in trained.text_encoder.parameters())
    assert not trained.vae.training and not trained.text_encoder.training


def test_at_init_the_adapter_is_a_no_op(make_recipe):
    recipe = make_recipe()
    base = load_base_model(recipe.model)
    reference = unet_output(base.unet)
    LoRAMethod(recipe).setup(base)
    assert any("lora_A" in n for n, _ in base.unet.named_parameters())
    assert torch.equal(unet_output(base.unet), reference)


@bit_identical_on_cpu
@pytest.mark.parametrize("optimizer", [{}, {"name": "prodigy", "lr": 1.0}, {"name": "adafactor"}], ids=["adamw", "prodigy", "adafactor"])
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(make_recipe, tmp_path, optimizer):
    """Also with the optimizers whose state lives partly in their parameter groups (Prodigy's step-size estimate),
    and through a warm-up (a resume once restarted at its first step's learning rate, 0, for good)."""
    common = dict(train__max_steps=6, train__gradient_accumulation_steps=2, lora__dropout=0.1, data__random_flip=True, data__crop="random",
                  optimizer__warmup_steps=2, **{f"optimizer__{key}": value for key, value in optimizer.items()})  # fmt: skip
    straight = train(make_recipe(output_dir=str(tmp_path / "straight"), **common))

    interrupted = make_recipe(output_dir=str(tmp_path / "resumed"), checkpoint__every_n_steps=3, **{**common, "train__max_steps": 3})
    train(interrupted)
    assert [p.name for p in list_checkpoints(tmp_path / "resumed" / "checkpoints")] == ["checkpoint-3"]
    resumed = train(make_recipe(output_dir=str(tmp_path / "resumed"), checkpoint__every_n_steps=3, **common), resume="latest")

    assert resumed.final_step == 6 and len(resumed.losses) == 3
    assert resumed.losses == straight.losses[3:]
    a = load_file(straight.output_dir / LORA_WEIGHTS_NAME)
    b = load_file(resumed.output_dir / LORA_WEIGHTS_NAME)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@bit_identical_on_cpu
def test_a_resumed_run_with_cached_encodings_is_bit_identical_too(make_recipe, tmp_path):
    """The resumed run fills its in-memory cache again, in other batches than the first run did: an entry
    encoded within a batch would differ in its last bits from the same image encoded among others."""
    common = dict(train__max_steps=6, train__batch_size=2, train__cache_latents=True, train__cache_text_embeddings=True)
    straight = train(make_recipe(output_dir=str(tmp_path / "straight"), **common))
    train(make_recipe(output_dir=str(tmp_path / "resumed"), checkpoint__every_n_steps=3, **{**common, "train__max_steps": 3}))
    resumed = train(make_recipe(output_dir=str(tmp_path / "resumed"), checkpoint__every_n_steps=3, **common), resume="latest")
    assert resumed.losses == straight.losses[3:]
    a, b = load_file(straight.output_dir / LORA_WEIGHTS_NAME), load_file(resumed.output_dir / LORA_WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_v_prediction_model_trains_against_velocity(tiny_vpred_model, tiny_model, make_recipe, monkeypatch):
    """The target is v = sqrt(a) * noise - sqrt(1 - a) * latents (a: the timestep's cumulative alpha), not the noise:
    on a v-prediction base, and on an epsilon base with model.prediction_type=v_prediction."""
    import finetune.methods.base as method_base

    noised = []
    real_add_noise = method_base.add_noise
    monkeypatch.setattr(method_base, "add_noise", lambda s, latents, noise, timesteps, *rest: noised.append(
        (s.alphas_cumprod, latents, noise, timesteps, real_add_noise(s, latents, noise, timesteps, *rest))) or noised[-1][-1])
    result = train(make_recipe(model__pretrained=str(tiny_vpred_model), train__max_steps=2))
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    train(make_recipe(model__pretrained=str(tiny_model), model__prediction_type="v_prediction", train__max_steps=1, output_dir=str(result.output_dir) + "-eps-base"))
    assert len(noised) == 3
    for alphas, latents, noise, timesteps, batch in noised:
        a = alphas[timesteps].view(-1, 1, 1, 1)
        assert torch.allclose(batch.target, a.sqrt() * noise - (1 - a).sqrt() * latents, atol=1e-6)
        assert not torch.allclose(batch.target, noise, atol=1e-2)


def test_bf16_mixed_precision_keeps_lora_weights_fp32(make_recipe):
    recipe = make_recipe(train__mixed_precision="bf16", train__max_steps=2)
    result = train(recipe)
    tensors = load_file(result.output_dir / LORA_WEIGHTS_NAME)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert all(torch.isfinite(torch.tensor(result.losses)))


@bit_identical_on_cpu
def test_channels_last_is_applied_and_trains_the_same_adapter(make_recipe, tmp_path, monkeypatch):
    import finetune.training.trainer as trainer

    loaded = []
    monkeypatch.setattr(trainer, "load_base_model", lambda *a, **k: loaded.append(load_base_model(*a, **k)) or loaded[-1])
    plain = train(make_recipe(output_dir=str(tmp_path / "plain"), train__max_steps=3))
    nhwc = train(make_recipe(output_dir=str(tmp_path / "nhwc"), train__max_steps=3, train__channels_last=True))

    for base, expected in zip(loaded, (False, True)):
        for model in (base.unet, base.vae):
            conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
            assert conv.weight.is_contiguous(memory_format=torch.channels_last) == expected
    assert torch.allclose(torch.tensor(plain.losses), torch.tensor(nhwc.losses), rtol=1e-4)
    a, b = load_file(plain.output_dir / LORA_WEIGHTS_NAME), load_file(nhwc.output_dir / LORA_WEIGHTS_NAME)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@bit_identical_on_cpu
def test_torch_compile_through_accelerate_saves_and_checkpoints_plain_names(make_recipe, tmp_path, monkeypatch):
    """`accelerate launch --dynamo_backend ...` compiles the UNet; the files must not name `_orig_mod.`."""
    compiled = []
    original_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or original_compile(model, **kw))
    common = dict(train__max_steps=3, checkpoint__every_n_steps=2, validation__prompts=["a shape"], validation__num_inference_steps=2)
    plain = train(make_recipe(output_dir=str(tmp_path / "plain"), **common))
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "EAGER")  # wrapped and traced as by inductor; no AOT or C++ build (half the time)
    fast = train(make_recipe(output_dir=str(tmp_path / "compiled"), **common))
    assert len(compiled) == 1 and fast.sample_grids

    a, b = load_file(plain.output_dir / LORA_WEIGHTS_NAME), load_file(fast.output_dir / LORA_WEIGHTS_NAME)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert torch.allclose(torch.tensor(plain.losses), torch.tensor(fast.losses), rtol=1e-5)
    # An uncompiled run resumes from the compiled run's last checkpoint (step 3) like from the plain run's.
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND")
    longer = {**common, "train__max_steps": 4}
    after_plain = train(make_recipe(output_dir=str(tmp_path / "plain"), **longer), resume="latest")
    after_compiled = train(make_recipe(output_dir=str(tmp_path / "compiled"), **longer), resume="latest")
    assert after_compiled.final_step == 4 and len(after_compiled.losses) == 1
    assert after_compiled.losses == pytest.approx(after_plain.losses, rel=1e-5)


@pytest.mark.parametrize(
    "targets,message",
    [
        (["to_q", "attn_foo"], r"^lora.target_modules: 'attn_foo' names no layer of the UNet2DConditionModel"),  # peft skips it silently
        (["norm1"], r"^lora.target_modules: 'norm1' names GroupNorm, LayerNorm layers of the UNet2DConditionModel, which LoRA does not adapt \("),
    ],
)
def test_target_modules_that_adapt_nothing_are_one_line_errors(make_recipe, targets, message):
    with pytest.raises(FinetuneError, match=message):
        train(make_recipe(lora__target_modules=targets, train__max_steps=1))


def test_lora_on_the_text_encoder_trains_at_its_own_rate_and_loads_in_diffusers(make_recipe, tiny_model):
    # A learning rate 1e9 times smaller for the text encoder's LoRA: its B (zero at the start) barely moves.
    recipe = make_recipe(lora__train_text_encoder=True, lora__text_encoder_lr=1e-12, train__max_steps=2, train__cache_text_embeddings=True)
    result = train(recipe)
    tensors = load_file(result.output_dir / LORA_WEIGHTS_NAME)
    ups = {part: [t for k, t in tensors.items() if k.startswith(part) and k.endswith("up.weight")] for part in ("unet.", "text_encoder.")}
    assert ups["text_encoder."] and max(t.abs().max().item() for t in ups["text_encoder."]) < 1e-9
    assert max(t.abs().max().item() for t in ups["unet."]) > 1e-4

    # At optimizer.lr it learns (the text-embedding cache, asked for, is not used while the encoder trains).
    recipe = make_recipe(output_dir=str(result.output_dir), lora__train_text_encoder=True, train__max_steps=2, train__cache_text_embeddings=True)
    result = train(recipe, overwrite=True)
    pipeline = StableDiffusionPipeline.from_pretrained(str(tiny_model))
    ids = pipeline.tokenizer(["a red circle"], return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipeline.text_encoder(ids)[0]
        pipeline.load_lora_weights(str(result.output_dir))  # diffusers takes both parts
        assert not torch.allclose(pipeline.text_encoder(ids)[0], before, atol=1e-6)

    with pytest.raises(FinetuneError, match=r"method dreambooth trains the text encoder with dreambooth.train_text_encoder; remove lora.train_text_encoder"):
        make_recipe(method="dreambooth", data__image_dir=None, lora__train_text_encoder=True,
                    dreambooth={"concepts": [{"instance_dir": "x", "instance_prompt": "a sks shape", "class_prompt": "a shape"}]})  # fmt: skip


def test_the_trained_adapter_is_on_disk_before_the_last_validation_samples(make_recipe, monkeypatch):
    import finetune.training.training_run as training_run

    def broken_sampler(*args, **kwargs):
        raise RuntimeError("the sampler broke")

    monkeypatch.setattr(training_run, "run_validation", broken_sampler)
    recipe = make_recipe(train__max_steps=2, validation__at_start=False)
    with pytest.raises(RuntimeError, match="the sampler broke"):
        train(recipe)
    assert (Path(recipe.output_dir) / LORA_WEIGHTS_NAME).is_file()
