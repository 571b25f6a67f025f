"""DreamBooth: class images from the right model and every one used, the prior term on the class half, frozen
parts untouched, and a saved pipeline that reproduces the trained UNet. Making the class images: test_class_images.py."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from finetune.config import ClassImageGeneration
from finetune.data.sources import Example
from finetune.dreambooth.data import dreambooth_collate
from finetune.errors import FinetuneError
from finetune.methods.dreambooth import DreamBoothMethod
from finetune.models.loading import load_base_model
from finetune.toyworld.datasets import write_folder
from finetune.training.trainer import train

SETTINGS = ClassImageGeneration(num_inference_steps=2, guidance_scale=3.0, batch_size=2, seed=5)


@pytest.fixture(scope="module")
def star_folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("star") / "star", 3, seed=11, include_held_out="only_shape")


def dreambooth_recipe(make_recipe, star_folder, tmp_path, **overrides):
    concept = {"instance_dir": str(star_folder), "instance_prompt": "a sks shape", "class_prompt": "a shape"}
    settings = {
        "concepts": [concept],
        "num_class_images": 4,
        "class_generation": SETTINGS.model_dump(),
        **overrides.pop("dreambooth", {}),
    }
    return make_recipe(method="dreambooth", dreambooth=settings, data__image_dir=None, train__batch_size=1, **overrides)


def test_class_images_come_from_the_base_as_it_predicts_when_training_targets_another_type(make_recipe, star_folder, tmp_path, monkeypatch):
    """model.prediction_type=v_prediction on an epsilon base (as for v on SD1.5): the frozen base still
    predicts noise, and class images sampled as if it predicted v would be noise."""
    import finetune.methods.dreambooth as dreambooth

    used, real_generate = [], dreambooth.generate_class_images
    monkeypatch.setattr(dreambooth, "generate_class_images", lambda pipeline, *a: used.append(pipeline.scheduler.config.prediction_type) or real_generate(pipeline, *a))
    recipe = dreambooth_recipe(make_recipe, star_folder, tmp_path, model__prediction_type="v_prediction", train__max_steps=1)
    recipe.dreambooth.num_class_images = 1
    train(recipe)
    assert used == ["epsilon"]


def test_prior_loss_is_computed_on_the_class_half(make_recipe, star_folder, tmp_path):
    recipe = dreambooth_recipe(make_recipe, star_folder, tmp_path, dreambooth={"prior_loss_weight": 0.5})
    method = DreamBoothMethod(recipe)
    per_sample = torch.tensor([1.0, 3.0, 10.0, 20.0])  # instances first, then their class images
    losses = method.combine_losses(per_sample, {"num_instance": 2})
    assert losses["instance_loss"].item() == 2.0
    assert losses["class_loss"].item() == 15.0
    assert losses["loss"].item() == 2.0 + 0.5 * 15.0

    items = [
        {"pixel_values": torch.full((3, 2, 2), float(i)), "caption": f"inst{i}", "index": i,
         "class_pixel_values": torch.full((3, 2, 2), 10.0 + i), "class_caption": "a shape"}
        for i in range(2)
    ]
    batch = dreambooth_collate(items)
    assert batch["captions"] == ["inst0", "inst1", "a shape", "a shape"]
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [0.0, 1.0, 10.0, 11.0]
    assert batch["num_instance"] == 2


def test_full_dreambooth_trains_the_unet_only_and_the_saved_pipeline_reproduces_it(make_recipe, star_folder, tmp_path):
    recipe = dreambooth_recipe(make_recipe, star_folder, tmp_path, train__max_steps=3, optimizer__lr=1e-4)
    import finetune.training.trainer as trainer_module

    captured = {}
    original = trainer_module.load_base_model
    trainer_module.load_base_model = lambda *a, **k: captured.setdefault("base", original(*a, **k))
    try:
        result = train(recipe)
    finally:
        trainer_module.load_base_model = original
    trained, fresh = captured["base"], load_base_model(recipe.model)

    class_dir = Path(recipe.output_dir) / "class_images" / "concept-0"
    assert len(list(class_dir.glob("*.png"))) == 4
    for part in ("vae", "text_encoder"):
        after_training = getattr(trained, part).state_dict()
        for name, tensor in getattr(fresh, part).state_dict().items():
            assert torch.equal(after_training[name], tensor), f"{part}.{name}"
    assert any(not torch.equal(a, b) for a, b in zip(trained.unet.state_dict().values(), fresh.unet.state_dict().values()))

    pipeline = StableDiffusionPipeline.from_pretrained(result.output_dir / "pipeline")
    generator = torch.Generator().manual_seed(0)
    latents, text = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        expected = trained.unet(latents, torch.tensor([500]), text).sample
        assert torch.equal(pipeline.unet(latents, torch.tensor([500]), text).sample, expected)
    saved_vae = pipeline.vae.state_dict()
    for name, tensor in fresh.vae.state_dict().items():  # frozen parts saved as they were
        assert torch.equal(saved_vae[name], tensor)
    # It says what it learned: its instance prompt, in its metadata and in its card, with how to load it.
    metadata = json.loads((result.output_dir / "pipeline" / "finetune_metadata.json").read_text())
    images = len(list(star_folder.glob("*.png")))
    assert json.loads(metadata["finetune.tag_frequency"]) == {star_folder.name: {"a sks shape": images}}
    card = (result.output_dir / "pipeline" / "README.md").read_text()
    assert f"| trained prompts and caption tags | a sks shape ({images}) |" in card and "StableDiffusionPipeline.from_pretrained" in card


def test_full_dreambooth_trains_the_text_encoder_at_its_own_rate(make_recipe, star_folder, tmp_path, monkeypatch):
    """One AdamW step moves each weight by at most its group's rate (Adam's first step is lr x the gradient's sign, here
    without weight decay or warmup): the text encoder's largest change is dreambooth.text_encoder_lr, the UNet's optimizer.lr."""
    import finetune.training.trainer as trainer_module

    recipe = dreambooth_recipe(
        make_recipe, star_folder, tmp_path, train__max_steps=1, optimizer__lr=1e-3, optimizer__scheduler="constant", optimizer__warmup_steps=0,
        optimizer__weight_decay=0.0, dreambooth={"adapter": "full", "train_text_encoder": True, "text_encoder_lr": 1e-4},
    )  # fmt: skip
    captured, original = {}, trainer_module.load_base_model
    monkeypatch.setattr(trainer_module, "load_base_model", lambda *a, **k: captured.setdefault("base", original(*a, **k)))
    train(recipe)
    trained, fresh = captured["base"], load_base_model(recipe.model)
    largest = {}
    for part in ("unet", "text_encoder"):
        after_step = getattr(trained, part).state_dict()
        largest[part] = max((after_step[name] - tensor).abs().max().item() for name, tensor in getattr(fresh, part).state_dict().items())
    assert largest == pytest.approx({"unet": 1e-3, "text_encoder": 1e-4}, rel=1e-2)


def test_dreambooth_lora_with_two_concepts_and_text_encoder(make_recipe, star_folder, image_folder, tmp_path, capsys, monkeypatch):
    import finetune.training.trainer as trainer_module

    concepts = [
        {"instance_dir": str(star_folder), "instance_prompt": "a sks shape", "class_prompt": "a shape"},
        {"instance_dir": str(image_folder), "instance_prompt": "a zwx pattern", "class_prompt": "a pattern"},
    ]
    recipe = dreambooth_recipe(
        make_recipe, star_folder, tmp_path, train__max_steps=2,
        dreambooth={"concepts": concepts, "adapter": "lora", "train_text_encoder": True, "num_class_images": 2, "text_encoder_lr": 1e-4},
    )
    rates, build_optimizer = [], trainer_module.build_optimizer

    def build(*args, **kwargs):
        optimizer = build_optimizer(*args, **kwargs)
        rates.append(sorted(group["lr"] for group in optimizer.param_groups))  # as built, before a schedule scales them
        return optimizer

    monkeypatch.setattr(trainer_module, "build_optimizer", build)
    result = train(recipe)
    assert rates == [[1e-4, recipe.optimizer.lr]]  # the text encoder's LoRA at dreambooth.text_encoder_lr, the UNet's at optimizer.lr
    for i in range(2):
        assert len(list((Path(recipe.output_dir) / "class_images" / f"concept-{i}").glob("*.png"))) == 2
    class_dir = Path(recipe.output_dir) / "class_images" / "concept-1"
    assert f"class images {class_dir}: 0 generated earlier, 2 to generate" in capsys.readouterr().out
    from safetensors.torch import load_file

    keys = load_file(result.output_dir / "pytorch_lora_weights.safetensors").keys()
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
    pipeline = StableDiffusionPipeline.from_pretrained(recipe.model.pretrained)
    pipeline.load_lora_weights(str(result.output_dir))  # diffusers accepts both parts

    # Continued from that LoRA, with more class prompts than class images: both are said at the start.
    concepts[0]["class_prompt"] = ["a shape", "a shape, small", "a shape, large"]
    capsys.readouterr()
    train(dreambooth_recipe(
        make_recipe, star_folder, tmp_path, train__max_steps=1, output_dir=str(tmp_path / "continued"), lora__init_from=str(result.output_dir),
        dreambooth={"concepts": concepts, "adapter": "lora", "train_text_encoder": True, "num_class_images": 2},
    ))  # fmt: skip
    out = capsys.readouterr().out
    assert f"starting from the LoRA {result.output_dir} (lora.init_from)" in out
    assert "warning: dreambooth.concepts[0] lists 3 class prompts and dreambooth.num_class_images is 2: the last prompt makes no class image" in out


def test_an_empty_or_missing_instance_folder_names_its_concept_key(make_recipe, star_folder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    good = {"instance_dir": str(star_folder), "instance_prompt": "a sks shape", "class_prompt": "a shape"}
    recipe = dreambooth_recipe(make_recipe, star_folder, tmp_path, dreambooth={"concepts": [good, {**good, "instance_dir": str(empty)}]})
    with pytest.raises(FinetuneError, match=r"data folder .*empty has no images .*: add some or fix dreambooth.concepts.1.instance_dir$"):
        train(recipe)
    recipe = dreambooth_recipe(make_recipe, star_folder, tmp_path, dreambooth={"concepts": [{**good, "instance_dir": "my_subject"}]})
    with pytest.raises(FinetuneError, match=r"^data folder my_subject not found: check dreambooth.concepts.0.instance_dir \(relative paths are read from the current folder, .*\)$"):
        train(recipe)


def test_class_images_of_another_size_are_resized_but_tiny_ones_stop_the_run(make_recipe, star_folder, tmp_path):
    class_dir = tmp_path / "classes"
    class_dir.mkdir()
    Image.new("RGB", (200, 120), "blue").save(class_dir / "big.png")
    concept = {"instance_dir": str(star_folder), "instance_prompt": "a sks shape", "class_prompt": "a shape", "class_dir": str(class_dir)}
    recipe = dreambooth_recipe(make_recipe, star_folder, tmp_path, train__max_steps=1, dreambooth={"concepts": [concept], "num_class_images": 1})
    train(recipe)  # the 200x120 image is resized and cropped to 64x64 like any training image
    Image.new("RGB", (10, 10), "blue").save(class_dir / "a-tiny.png")
    with pytest.raises(FinetuneError, match=r"a-tiny\.png is 10x10"):
        train(recipe, overwrite=True)


def test_a_bad_class_image_of_the_user_stops_the_run_before_the_model_loads_to_generate(make_recipe, star_folder, tmp_path, monkeypatch):
    import finetune.training.trainer as trainer

    class_dir = tmp_path / "classes"
    class_dir.mkdir()
    Image.new("RGB", (10, 10), "blue").save(class_dir / "tiny.png")
    concept = {"instance_dir": str(star_folder), "instance_prompt": "a sks shape", "class_prompt": "a shape", "class_dir": str(class_dir)}
    recipe = dreambooth_recipe(make_recipe, star_folder, tmp_path, dreambooth={"concepts": [concept], "num_class_images": 3})
    monkeypatch.setattr(trainer, "load_base_model", lambda *a, **k: pytest.fail("loaded the model (to generate 2 class images)"))
    with pytest.raises(FinetuneError, match=r"tiny\.png is 10x10"):
        train(recipe)


def test_cached_encoders_give_the_same_instance_and_class_losses(make_recipe, star_folder, tmp_path, monkeypatch):
    """Instance and class images share the latent cache (keyed by content and view): same losses, fewer encodings."""
    import finetune.methods.base as base_module

    encoded = []
    original = base_module.posterior_moments
    monkeypatch.setattr(base_module, "posterior_moments", lambda vae, pixels: encoded.append(len(pixels)) or original(vae, pixels))
    concept = {"instance_dir": str(star_folder), "instance_prompt": "a sks shape", "class_prompt": "a shape", "class_dir": str(tmp_path / "class")}
    common = dict(dreambooth={"concepts": [concept], "adapter": "lora"}, train__max_steps=12, data__random_flip=True)
    plain = train(dreambooth_recipe(make_recipe, star_folder, tmp_path, output_dir=str(tmp_path / "plain"), **common))
    assert sum(encoded) == 12 * 2  # one instance and one class image per step
    encoded.clear()
    cached = train(dreambooth_recipe(
        make_recipe, star_folder, tmp_path, output_dir=str(tmp_path / "cached"), train__cache_latents=True, train__cache_text_embeddings=True, **common
    ))  # fmt: skip
    assert torch.allclose(torch.tensor(plain.losses), torch.tensor(cached.losses), rtol=1e-5, atol=1e-6)
    assert sum(encoded) <= (3 + 4) * 2  # at most each instance and class image, flipped or not, once


def test_every_class_image_of_every_concept_is_used(make_recipe, star_folder, tmp_path):
    """Two concepts of two instances and four class images each: two epochs deal out all eight. (Dealing
    by the item's index over all instances used only half of each pool.)"""
    from finetune.dreambooth.data import DreamBoothDataset

    def image_example(name: str) -> Example:
        return Example(name, name, lambda: Image.new("RGB", (64, 64)), size=(64, 64))

    instances = [(concept, image_example(f"instance {concept}.{i}")) for concept in (0, 1) for i in range(2)]
    class_examples = [[image_example(f"class {concept}.{k}") for k in range(4)] for concept in (0, 1)]
    dataset = DreamBoothDataset(instances, class_examples, dreambooth_recipe(make_recipe, star_folder, tmp_path))
    used = {dataset[(index, epoch)]["class_caption"] for epoch in (0, 1) for index in range(4)}
    assert used == {f"class {concept}.{k}" for concept in (0, 1) for k in range(4)}
    for index in range(4):  # a class image of the instance's own concept
        assert dataset[(index, 0)]["class_caption"].startswith(f"class {instances[index][0]}.")
    # An instance held out of training (validation.loss_images): the others are dealt its turns, so
    # every class image still trains.
    without_0 = DreamBoothDataset(instances, class_examples, dreambooth_recipe(make_recipe, star_folder, tmp_path), held_out=frozenset({0}))
    used = {without_0[(index, epoch)]["class_caption"] for epoch in range(4) for index in (1, 2, 3)}
    assert used == {f"class {concept}.{k}" for concept in (0, 1) for k in range(4)}
    every_1_held = DreamBoothDataset(instances, class_examples, dreambooth_recipe(make_recipe, star_folder, tmp_path), held_out=frozenset({2, 3}))
    assert [every_1_held[(index, 0)]["class_caption"] for index in (2, 3)] == ["class 1.0", "class 1.0"]  # scored; none of concept 1 trains

    # data.caption_dropout empties instance captions (as for the other methods); class images keep theirs.
    dropping = DreamBoothDataset(instances, class_examples, dreambooth_recipe(make_recipe, star_folder, tmp_path, data__caption_dropout=0.5))
    items = [dropping[(index, epoch)] for epoch in range(8) for index in range(4)]
    dropped = [item["caption"] == "" for item in items]
    assert 4 < sum(dropped) < 28 and all(item["class_caption"].startswith("class ") for item in items)


def concept_with_a_broken_class_image(star_folder, tmp_path) -> tuple[Path, dict]:
    """(its class folder: a good image and an unreadable one, the concept)."""
    class_dir = tmp_path / "classes"
    class_dir.mkdir()
    Image.new("RGB", (64, 64), "blue").save(class_dir / "good.png")
    (class_dir / "broken.png").write_bytes(b"not a png")
    return class_dir, {"instance_dir": str(star_folder), "instance_prompt": "a sks shape", "class_prompt": "a shape", "class_dir": str(class_dir)}


def test_check_data_checks_the_class_images_as_training_does(make_recipe, star_folder, tmp_path, capsys):
    import yaml

    from finetune.cli.main import main

    class_dir, concept = concept_with_a_broken_class_image(star_folder, tmp_path)
    recipe = dreambooth_recipe(make_recipe, star_folder, tmp_path, dreambooth={"concepts": [concept], "num_class_images": 3})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    assert main(["check-data", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"class images {class_dir} (1 more to generate): 2 images, 1 used" in out
    assert f"fatal: image {class_dir / 'broken.png'} cannot be read" in out


def test_a_concept_reading_captions_says_how_to_do_without_them(make_recipe, tmp_path):
    folder = tmp_path / "subject"
    folder.mkdir()
    Image.new("RGB", (64, 64), "red").save(folder / "0001.png")  # no caption beside it
    concept = {"instance_dir": str(folder), "instance_prompt": "a sks shape", "class_prompt": "a shape", "use_captions": True}
    recipe = dreambooth_recipe(make_recipe, folder, tmp_path, dreambooth={"concepts": [concept]})
    with pytest.raises(FinetuneError, match=r"0001\.png has no caption: .* or set dreambooth.concepts.0.use_captions: false to train with its instance_prompt"):
        train(recipe)


def test_class_images_skipped_as_bad_are_counted_in_a_warning(make_recipe, star_folder, tmp_path, capsys):
    class_dir, concept = concept_with_a_broken_class_image(star_folder, tmp_path)
    recipe = dreambooth_recipe(make_recipe, star_folder, tmp_path, train__max_steps=1, data__skip_bad_images=True,
                               dreambooth={"concepts": [concept], "num_class_images": 3})  # fmt: skip
    train(recipe)
    assert f"warning: 2 of 3 class images in {class_dir} are usable (the others were skipped as bad)" in capsys.readouterr().out


def set_up_to_make_class_images(recipe, monkeypatch, on_generate):
    """The method as training sets it up, `on_generate(pipeline)` in place of the generation; returns
    (method, base, make) where make() runs the method's class-image step for the first concept."""
    import finetune.methods.dreambooth as dreambooth

    recipe.dreambooth.num_class_images = 1
    method = DreamBoothMethod(recipe)
    method.check_data()
    base = load_base_model(recipe.model)
    method.setup(base)
    monkeypatch.setattr(dreambooth, "generate_class_images", lambda pipeline, *args: on_generate(pipeline))
    accelerator = SimpleNamespace(print=print, process_index=0, num_processes=1, wait_for_everyone=lambda: None)
    return method, base, lambda: method._class_images(recipe.dreambooth.concepts[0], method.class_plans[0], accelerator)


def unet_output(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), text).sample


def test_class_images_are_made_with_the_unet_where_the_vae_and_text_encoder_are(make_recipe, star_folder, tmp_path, monkeypatch):
    """On a GPU the trainer moves the VAE and text encoder there before the data is built, and the UNet only
    moves at accelerate's `prepare`: generation ran with the UNet on the CPU ('mat1 is on cuda:0 ... cpu').
    The meta device stands in for the GPU."""
    devices = []

    def record_and_stop(pipeline):
        devices.append({p.device.type for part in (pipeline.unet, pipeline.vae, pipeline.text_encoder) for p in part.parameters()})
        raise InterruptedError

    recipe = dreambooth_recipe(make_recipe, star_folder, tmp_path, train__max_steps=1)
    _, base, make = set_up_to_make_class_images(recipe, monkeypatch, record_and_stop)
    base.vae.to("meta"), base.text_encoder.to("meta")
    with pytest.raises(InterruptedError):
        make()
    assert devices == [{"meta"}]


def test_class_images_come_from_the_loaded_base_when_the_lora_starts_from_a_file(make_recipe, star_folder, tmp_path, monkeypatch):
    """With lora.init_from the starting LoRA is in the UNet before class images are made: they came from
    base + LoRA, not the base's own prior. Its dropout is off then too (no draws from the device's random
    numbers); afterwards the LoRA, its trainable weights and train mode are back."""
    first = train(make_recipe(output_dir=str(tmp_path / "first"), train__max_steps=2, optimizer__lr=0.05))  # far from a no-op
    recipe = dreambooth_recipe(make_recipe, star_folder, tmp_path, dreambooth={"adapter": "lora", "train_text_encoder": True},
                               lora__init_from=str(first.output_dir), lora__dropout=0.5, train__max_steps=1)  # fmt: skip
    bare = unet_output(load_base_model(recipe.model).unet)
    seen = []

    def record_and_stop(pipeline):
        seen.append((unet_output(pipeline.unet), pipeline.unet.training, pipeline.text_encoder.training))
        raise InterruptedError

    _, base, make = set_up_to_make_class_images(recipe, monkeypatch, record_and_stop)
    started = unet_output(base.unet.eval())  # dropout off, to compare
    assert not torch.allclose(started, bare, atol=1e-4)
    base.unet.train()
    with pytest.raises(InterruptedError):
        make()
    (output, unet_training, text_training), = seen
    assert torch.equal(output, bare) and not unet_training and not text_training
    assert base.unet.training and base.text_encoder.training and torch.equal(unet_output(base.unet.eval()), started)
    trainable = [name for part in (base.unet, base.text_encoder) for name, p in part.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
