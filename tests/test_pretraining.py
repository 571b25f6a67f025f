"""The methods that pretrain the toy-world base: the VAE, then the UNet with the text encoder."""

import torch
import yaml
from diffusers import AutoencoderKL, StableDiffusionPipeline

from finetune.models.loading import load_base_model
from finetune.training.trainer import train


def trained_base(monkeypatch) -> list:
    """The base model training loads (and trains), once train() has run."""
    import finetune.training.trainer as trainer

    loaded = []
    monkeypatch.setattr(trainer, "load_base_model", lambda *a, **k: loaded.append(load_base_model(*a, **k)) or loaded[-1])
    return loaded


def same_weights(a, b) -> bool:
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[name].cpu(), b[name].cpu()) for name in a)


def test_vae_method_learns_to_reconstruct_and_saves_a_pipeline(make_recipe, monkeypatch):
    recipe = make_recipe(method="vae", train__max_steps=24, train__batch_size=4, optimizer__lr=2e-3, validation__at_start=False)
    before = load_base_model(recipe.model)
    trained = trained_base(monkeypatch)
    result = train(recipe)
    assert result.losses[-1] < 0.7 * result.losses[0]  # measured: 0.38x at step 24 (0.74x until step 16, 0.50x at 20)
    pipeline_dir = result.output_dir / "pipeline"
    vae = AutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae")
    assert same_weights(vae, trained[0].vae) and not same_weights(vae, before.vae)  # the VAE as trained
    assert vae.config.scaling_factor != before.vae.config.scaling_factor  # set from the latents' std
    after = load_base_model(recipe.model.model_copy(update={"pretrained": str(pipeline_dir)}))
    after_unet = after.unet.state_dict()
    for name, tensor in before.unet.state_dict().items():  # only the VAE trained
        assert torch.equal(after_unet[name], tensor)
    assert list((result.output_dir / "samples").glob("step-*.png"))


def test_a_resumed_vae_run_saves_the_scaling_factor_of_an_uninterrupted_one(make_recipe, tmp_path):
    """The factor comes from a running std of the latents over all steps, which the checkpoint keeps."""
    common = dict(method="vae", train__max_steps=4, train__batch_size=2, validation__at_start=False, checkpoint__every_n_steps=2)
    whole = train(make_recipe(output_dir=str(tmp_path / "whole"), **common))
    resumed = train(make_recipe(output_dir=str(tmp_path / "resumed"), **common), resume=str(whole.output_dir / "checkpoints" / "checkpoint-2"))
    factors = [AutoencoderKL.load_config(run.output_dir / "pipeline" / "vae")["scaling_factor"] for run in (whole, resumed)]
    assert factors[0] == factors[1]


def test_full_method_with_text_encoder_trains_both_and_reloads(make_recipe, monkeypatch):
    recipe = make_recipe(method="full", full__train_text_encoder=True, full__text_encoder_lr=1e-4, train__max_steps=2)
    before = load_base_model(recipe.model)
    trained = trained_base(monkeypatch)
    import finetune.training.trainer as trainer

    rates, build_optimizer = [], trainer.build_optimizer

    def build(*args, **kwargs):
        optimizer = build_optimizer(*args, **kwargs)
        rates.append([group["lr"] for group in optimizer.param_groups])  # as built, before a schedule scales them
        return optimizer

    monkeypatch.setattr(trainer, "build_optimizer", build)
    result = train(recipe)
    assert sorted(rates[0]) == [1e-4, recipe.optimizer.lr]  # the text encoder at full.text_encoder_lr, the UNet at optimizer.lr
    pipeline = StableDiffusionPipeline.from_pretrained(result.output_dir / "pipeline")
    assert same_weights(pipeline.unet, trained[0].unet) and same_weights(pipeline.text_encoder, trained[0].text_encoder)  # as trained
    changed = lambda a, b: any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert changed(pipeline.unet, before.unet)
    assert changed(pipeline.text_encoder, before.text_encoder)
    assert not changed(pipeline.vae, before.vae)


def test_vae_perceptual_term_is_added_with_its_weight(make_recipe, tmp_path):
    from finetune.toyworld.classifier import DEFAULT_PATH

    common = dict(method="vae", train__max_steps=1, train__batch_size=4, validation__at_start=False)
    plain = train(make_recipe(output_dir=str(tmp_path / "plain"), **common))  # a network without its weight is refused
    weighted = train(make_recipe(output_dir=str(tmp_path / "weighted"), vae__perceptual_weight=10.0, vae__perceptual_network=str(DEFAULT_PATH), **common))
    assert weighted.losses[0] > plain.losses[0]  # same batch and noise: the difference is the perceptual term


def test_vae_perceptual_network_must_be_a_classifier_file(make_recipe, tmp_path, monkeypatch):
    """Another model's weights gave a RuntimeError listing every missing and unexpected key; a folder, 'not found'.
    Said before the images are read and the model loads (it was said after both)."""
    from safetensors.torch import save_file
    from finetune.errors import FinetuneError
    import finetune.methods.base
    import finetune.training.trainer
    import pytest

    def too_late(*args, **kwargs):
        raise AssertionError("the data check or the model load ran first")

    monkeypatch.setattr(finetune.methods.base, "checked_examples", too_late)
    monkeypatch.setattr(finetune.training.trainer, "load_base_model", too_late)

    save_file({"unet.up.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
    for network, message in ((tmp_path / "none.safetensors", r"vae.perceptual_network .* not found"),
                             (tmp_path, r"vae.perceptual_network .* is a folder: give the classifier's .safetensors file$"),
                             (tmp_path / "lora.safetensors", r"lora.safetensors is not a toy-world classifier file \(.*\): train one with ")):  # fmt: skip
        with pytest.raises(FinetuneError, match=message):
            train(make_recipe(method="vae", output_dir=str(tmp_path / "run"), train__max_steps=1, vae__perceptual_weight=0.1, vae__perceptual_network=str(network)))


def test_the_vae_trains_on_images_without_captions_and_check_data_says_so(make_recipe, tmp_path, capsys):
    """The autoencoder reads no prompt: an uncaptioned image stopped its run ("has no caption") and check-data's."""
    from finetune.cli.main import main
    from finetune.toyworld.datasets import write_folder

    folder = write_folder(tmp_path / "images", 4, seed=3, metadata=False)
    for caption in folder.glob("*.txt"):
        caption.unlink()
    recipe = make_recipe(method="vae", data__image_dir=str(folder), train__max_steps=1, validation__at_start=False)
    (tmp_path / "vae.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    assert main(["check-data", str(tmp_path / "vae.yaml")]) == 0
    assert "result: ready to train" in capsys.readouterr().out
    assert train(recipe).final_step == 1
