"""Loss masks (data.loss_mask): the weighted loss against its formula, masks cut exactly like their
images, every bad mask one line before training, and in training: black pixels get no gradient, class
images stay unmasked, and cached latents change nothing."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from finetune.cli.main import main
from finetune.config import DataConfig, LossMaskConfig
from finetune.data.items import CaptionedImageDataset
from finetune.data_check.check import CONVERTED, WARNING, inspect_examples
import finetune.methods.base as method_base
from data_examples import load_examples
from finetune.data.loss_mask import MIN_NORMALIZING_SHARE, latent_loss_weights, preview, read_mask_file
from finetune.data.sources import read_examples
from finetune.errors import FinetuneError
from finetune.training.diffusion import NoisedBatch, per_sample_loss
from finetune.training.trainer import train
from test_dreambooth import dreambooth_recipe
from odd_images import noise
from test_objective import SCHEDULER
from conftest import SHIPPED_BASE  # a base check-data finds offline (the default hub id is in no cache)


def masked_folder(folder: Path, count=4, size=(64, 64), mask=lambda width, height: half_mask(width, height)) -> Path:
    """`count` noise images with captions, and in masks/ a mask per image (by default its left half white)."""
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        noise(*size, seed=i).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"image {i}")
        mask(*size).save(folder / "masks" / f"{i}.png")
    return folder


def half_mask(width, height):
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, 0, width // 2, height))
    return mask


def test_weighted_loss_is_the_weighted_mean_per_sample_and_ignores_unweighted_pixels():
    target = torch.zeros(2, 4, 4, 4)
    batch = NoisedBatch(noisy_latents=target, timesteps=torch.tensor([10, 500]), target=target)
    prediction = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(2, 1, 4, 4)
    assert torch.allclose(per_sample_loss(prediction, batch, SCHEDULER, weights=ones), per_sample_loss(prediction, batch, SCHEDULER))
    weights = ones.clone()
    weights[:, :, :, 2:] = 0.0
    weights[1, :, :, :2] = 0.5  # grey: normalized away within the sample
    expected = prediction[:, :, :, :2].square().mean(dim=(1, 2, 3))
    assert torch.allclose(per_sample_loss(prediction, batch, SCHEDULER, weights=weights), expected)
    changed = prediction.clone()
    changed[:, :, :, 2:] += 100.0  # only where the weight is 0
    assert torch.allclose(per_sample_loss(changed, batch, SCHEDULER, weights=weights), expected)
    assert torch.equal(per_sample_loss(prediction, batch, SCHEDULER, weights=torch.zeros(2, 1, 4, 4)), torch.zeros(2))  # not NaN
    # A sliver of weight (one latent at 0.01) is normalized by at least 1/32 of the pixels, not by 0.01 alone.
    sliver = torch.zeros(2, 1, 4, 4)
    sliver[:, :, 0, 0] = 0.01
    floor = MIN_NORMALIZING_SHARE * 16
    assert torch.allclose(per_sample_loss(prediction, batch, SCHEDULER, weights=sliver), prediction[:, :, 0, 0].square().mean(dim=1) * 0.01 / floor)
    huber = per_sample_loss(changed, batch, SCHEDULER, huber_c=0.1, weights=weights)
    left = NoisedBatch(noisy_latents=target[..., :2], timesteps=batch.timesteps, target=target[..., :2])
    assert torch.allclose(huber, per_sample_loss(prediction[..., :2], left, SCHEDULER, huber_c=0.1))


def test_latent_weights_average_each_8x8_patch_and_raise_black_to_the_unmasked_weight():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :8] = 1.0  # one whole patch
    mask[..., :8, 8:12] = 1.0  # half a patch
    assert torch.equal(latent_loss_weights(mask, (2, 2), 0.0), torch.tensor([[[[1.0, 0.5], [0.0, 0.0]]]]))
    assert torch.allclose(latent_loss_weights(mask, (2, 2), 0.1), torch.tensor([[[[1.0, 0.55], [0.1, 0.1]]]]))


def test_a_mask_is_cut_like_its_image_through_crops_flips_and_buckets(tmp_path):
    """Each image's red channel is its mask: every view of the pair must still agree pixel for pixel."""
    folder = tmp_path / "data"
    (folder / "masks").mkdir(parents=True)
    for i, size in enumerate([(96, 64), (64, 112), (80, 80)]):
        mask = Image.fromarray(np.random.default_rng(i).integers(0, 256, size[::-1], dtype=np.uint8))
        Image.merge("RGB", (mask, Image.new("L", size, 0), Image.new("L", size, 0))).save(folder / f"{i}.png")
        mask.save(folder / "masks" / f"{i}.webp", lossless=True)  # found by the image's stem, any format
        (folder / f"{i}.txt").write_text("x")
    for extra in ({}, {"bucketing": {"enabled": True, "step": 16}}):
        config = DataConfig(image_dir=str(folder), resolution=48, crop="random", random_flip=True, loss_mask={"source": "files"}, **extra)
        dataset = CaptionedImageDataset(load_examples(config), config, seed=0)
        flips = set()
        for epoch in range(4):
            for index in range(3):
                item = dataset[(index, epoch)]
                red = (item["pixel_values"][0] + 1.0) * 127.5 / 255.0
                assert item["loss_mask"].shape == (1, *red.shape)
                assert torch.allclose(item["loss_mask"][0], red, atol=1e-5)
                flips.add(bool(torch.allclose(item["loss_mask"][0], red.flip(-1), atol=1e-5)))
        assert flips == {False}  # (the check means something: a mirrored mask would not match)


def test_every_bad_mask_is_one_line_naming_the_file_before_training(tmp_path, make_recipe):
    folder = masked_folder(tmp_path / "data")
    config = DataConfig(image_dir=str(folder), resolution=64, loss_mask={"source": "files"})
    assert [e.mask_area for e in load_examples(config)] == [0.5] * 4
    (folder / "masks" / "1.png").unlink()
    with pytest.raises(FinetuneError, match=rf"image {folder / '1.png'} has no loss mask: expected {folder / 'masks' / '1.png'} \(or 1 with another image suffix"):
        load_examples(config)
    half_mask(64, 48).save(folder / "masks" / "1.png")
    with pytest.raises(FinetuneError, match=rf"loss mask {folder / 'masks' / '1.png'} is 64x48 but image {folder / '1.png'} is 64x64 upright: a mask must have"):
        load_examples(config)
    Image.new("L", (64, 64), 0).save(folder / "masks" / "1.png")
    with pytest.raises(FinetuneError, match=r"is black everywhere, so image .*1.png would train nothing"):
        load_examples(config)
    assert len(load_examples(config.model_copy(update={"loss_mask": LossMaskConfig(source="files", unmasked_weight=0.1)}))) == 4  # trains a little
    (folder / "masks" / "1.png").write_bytes(b"not a png")
    with pytest.raises(FinetuneError, match=rf"loss mask {folder / 'masks' / '1.png'} cannot be read"):
        load_examples(config)
    # The same check stops training before any model loads (the base's files are checked before it, its weights load after).
    with pytest.raises(FinetuneError, match=r"cannot be read"):
        train(make_recipe(data__image_dir=str(folder), data__loss_mask={"source": "files"}))
    # data.skip_bad_images leaves the image out, as any bad image.
    skipped = config.model_copy(update={"skip_bad_images": True})
    assert len(load_examples(skipped)) == 3


def test_alpha_masks_come_from_transparency_and_an_opaque_image_trains_whole(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rgba = noise(64, 64).convert("RGBA")
    rgba.putalpha(half_mask(64, 64))
    rgba.save(folder / "cut-out.png")
    noise(64, 64, seed=1).save(folder / "opaque.png")
    for name in ("cut-out", "opaque"):
        (folder / f"{name}.txt").write_text(name)
    config = DataConfig(image_dir=str(folder), resolution=64, loss_mask={"source": "alpha"})
    report = inspect_examples(read_examples(config), config, "data")
    assert [(f.level, f.message) for f in report.findings if f.level == WARNING] == [
        (WARNING, f"image {folder / 'opaque.png'} has no transparency: it trains whole (data.loss_mask.source alpha); add an alpha channel to mask it")
    ]
    assert "loss masks (their transparency): 1 of 2 images masked, trained area 50%; background weight 0" in report.lines()
    converted = [f.message for f in report.findings if f.level == CONVERTED]
    assert converted == [f"image {folder / 'cut-out.png'}: transparency (RGBA): its loss mask; the pixels composited on white"]
    dataset = CaptionedImageDataset(load_examples(config), config, seed=0)
    cut_out, opaque = dataset[(0, 0)]["loss_mask"], dataset[(1, 0)]["loss_mask"]
    assert torch.equal(cut_out[0, :, :32], torch.ones(64, 32)) and torch.equal(cut_out[0, :, 32:], torch.zeros(64, 32))
    assert torch.equal(opaque, torch.ones(1, 64, 64))


def test_recipes_that_cannot_use_masks_are_refused_on_load(make_recipe, pairs_folder):
    with pytest.raises(FinetuneError, match=r"data.loss_mask.source files reads masks from folders beside the images.*use source alpha"):
        make_recipe(data__image_dir=None, data__dataset="some/dataset", data__loss_mask={"source": "files"})
    with pytest.raises(FinetuneError, match=r"data.loss_mask weighs the denoising loss of lora, full and dreambooth; method controlnet does not use it"):
        make_recipe(method="controlnet", data__image_dir=str(pairs_folder), data__loss_mask={"source": "alpha"})
    with pytest.raises(FinetuneError, match=r"data.loss_mask is a section, not 'files': set data.loss_mask.source: files or alpha"):
        make_recipe(data__loss_mask="files")
    with pytest.raises(FinetuneError, match=r"data.loss_mask.unmasked_weight.*below 1"):
        make_recipe(data__loss_mask={"source": "files", "unmasked_weight": 1.0})


def record_loss_gradients(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weights, d loss / d prediction) of each training step's per-sample loss."""
    seen, real = [], method_base.per_sample_loss

    def per_sample_loss(prediction, batch, scheduler, *args):
        loss = real(prediction, batch, scheduler, *args)
        gradient = torch.autograd.grad(loss.sum(), prediction, retain_graph=True)[0]
        seen.append((args[-1], gradient))
        return loss

    monkeypatch.setattr(method_base, "per_sample_loss", per_sample_loss)
    return seen


def test_in_training_black_pixels_get_no_gradient_and_a_white_mask_changes_nothing(make_recipe, tmp_path, monkeypatch):
    folder = masked_folder(tmp_path / "data")
    common = dict(data__image_dir=str(folder), data__random_flip=True, train__max_steps=3)
    seen = record_loss_gradients(monkeypatch)
    train(make_recipe(output_dir=str(tmp_path / "masked"), data__loss_mask={"source": "files"}, **common))
    assert len(seen) == 3
    for weights, gradient in seen:  # tiny model: 64 px images make 8x8 latents, 4 columns of them white
        for row_weights, row_gradient in zip(weights, gradient):
            trained = row_weights[0, 0] > 0  # a row's weights: its left half, or the right one when flipped
            assert trained.sum() == 4 and torch.equal(trained, row_weights[0, -1] > 0)
            assert torch.all(row_gradient[..., ~trained] == 0) and torch.all(row_gradient[..., trained] != 0)
    masked_folder(folder, mask=lambda width, height: Image.new("L", (width, height), 255))
    monkeypatch.undo()  # the real per_sample_loss again
    white = train(make_recipe(output_dir=str(tmp_path / "white"), data__loss_mask={"source": "files"}, **common))
    plain = train(make_recipe(output_dir=str(tmp_path / "plain"), **common))
    assert torch.allclose(torch.tensor(white.losses), torch.tensor(plain.losses), rtol=1e-5)


def test_cached_latents_give_the_masked_run_the_same_losses(make_recipe, tmp_path):
    folder = masked_folder(tmp_path / "data")
    common = dict(data__image_dir=str(folder), data__random_flip=True, train__max_steps=4, data__loss_mask={"source": "files"})
    plain = train(make_recipe(output_dir=str(tmp_path / "plain"), **common))
    cached = train(make_recipe(output_dir=str(tmp_path / "cached"), train__cache_latents=True, train__cache_text_embeddings=True, **common))
    unmasked = train(make_recipe(output_dir=str(tmp_path / "unmasked"), **{**common, "data__loss_mask": {"source": "none"}}))
    assert torch.allclose(torch.tensor(plain.losses), torch.tensor(cached.losses), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(torch.tensor(plain.losses), torch.tensor(unmasked.losses), rtol=1e-3)
    # Each run shows what trains: the first views with their masked-out halves dimmed (the cached run's views
    # are rendered from their names).
    for run in (plain, cached):
        strip = np.asarray(Image.open(run.output_dir / "samples" / "loss-masks.png"), dtype=np.float32)
        assert strip.shape == (64, 4 * 64, 3)
        for cell in np.split(strip, 4, axis=1):
            halves = sorted([cell[:, :32].mean(), cell[:, 32:].mean()])
            assert halves[0] < 0.3 * halves[1]  # one half (the left, or the right when flipped) dimmed
    assert not (unmasked.output_dir / "samples" / "loss-masks.png").exists()
    # Recorded, and in the kohya export as sd-scripts' ss_masked_loss (which LoRA inspectors show).
    from finetune.formats.kohya import load_lora, to_kohya

    masked_lora, plain_lora = (load_lora(run.output_dir / "pytorch_lora_weights.safetensors") for run in (plain, unmasked))
    assert masked_lora.metadata["finetune.loss_mask"] == "files" and "finetune.loss_mask" not in plain_lora.metadata
    assert to_kohya(masked_lora)[1]["ss_masked_loss"] == "True" and to_kohya(plain_lora)[1]["ss_masked_loss"] == "False"


@pytest.mark.parametrize("cache_latents", [False, True])
def test_dreambooth_masks_its_instances_and_not_its_class_images(make_recipe, tmp_path, monkeypatch, cache_latents):
    folder = masked_folder(tmp_path / "subject", count=2)
    seen = record_loss_gradients(monkeypatch)
    recipe = dreambooth_recipe(make_recipe, folder, tmp_path, data__loss_mask={"source": "files"}, train__max_steps=2, train__cache_latents=cache_latents)
    train(recipe)
    assert len(seen) == 2  # a step's loss each: none seen would pass the loop below
    for weights, _ in seen:
        instance, class_image = weights  # batch size 1: the instance row, then its class image's
        assert instance.sum() == 32 and torch.equal(class_image, torch.ones_like(class_image))


def test_check_data_reports_the_masks_and_stops_on_a_missing_one(tmp_path, capsys):
    folder = masked_folder(tmp_path / "data")
    args = ["check-data", "--image-dir", str(folder), "--resolution", "64"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{pretrained: {SHIPPED_BASE}}}\ndata:\n  image_dir: {folder}\n  resolution: 64\n  loss_mask:\n    source: files\n")
    assert main(["check-data", str(recipe)]) == 0
    assert "loss masks (files in each folder's masks/): 4 of 4 images masked, trained area 50%; background weight 0" in capsys.readouterr().out
    (folder / "masks" / "2.png").unlink()
    assert main(["check-data", str(recipe)]) == 1
    assert f"fatal: image {folder / '2.png'} has no loss mask" in capsys.readouterr().out
    assert main(args) == 0  # without the recipe's loss_mask, masks are not looked for


def test_held_out_images_are_scored_with_their_masks(make_recipe, tmp_path):
    folder = masked_folder(tmp_path / "data", count=5)
    common = dict(data__image_dir=str(folder), train__max_steps=1, validation__loss_images=1, validation__at_start=True)
    first = {}  # the loss at step 0, before any training: the same model, only the weighting differs
    for name, mask in (("masked", "files"), ("plain", "none")):  # (the masked run with cached latents: the same numbers)
        cached = {"train__cache_latents": True} if name == "masked" else {}
        first[name] = train(make_recipe(output_dir=str(tmp_path / name), data__loss_mask={"source": mask}, **common, **cached)).validation_losses[0]
    masked_folder(folder, count=5, mask=lambda width, height: Image.new("L", (width, height), 255))
    first["white"] = train(make_recipe(output_dir=str(tmp_path / "white"), data__loss_mask={"source": "files"}, **common)).validation_losses[0]
    assert first["masked"][0] == first["plain"][0] == 0 and first["masked"][1] != pytest.approx(first["plain"][1], rel=1e-3)
    assert first["white"][1] == pytest.approx(first["plain"][1], rel=1e-5)


def test_mask_files_in_other_forms_read_as_a_user_means_them(tmp_path):
    """16-bit greys are scaled (not clipped), transparency is black, colour is read by its red channel (as
    sd-scripts does), a mask may have another scale or suffix case, and a rotated photo's mask names EXIF."""
    sixteen = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    sixteen.save(tmp_path / "sixteen.png")
    assert np.asarray(read_mask_file(tmp_path / "sixteen.png")).tolist() == [[127] * 4] * 4  # 32768 / 257, not clipped to 255
    cut_out = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    cut_out.paste((255, 255, 255, 255), (0, 0, 2, 4))
    cut_out.save(tmp_path / "cut-out.png")
    assert np.asarray(read_mask_file(tmp_path / "cut-out.png"))[0].tolist() == [255, 255, 0, 0]
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "red.png")
    assert np.asarray(read_mask_file(tmp_path / "red.png")).min() == 255

    folder = masked_folder(tmp_path / "data", count=2, size=(64, 96))
    (folder / "masks" / "0.png").rename(folder / "masks" / "0.PNG")  # any case
    half_mask(32, 48).save(folder / "masks" / "1.png")  # half the image's size: resized with it
    config = DataConfig(image_dir=str(folder), resolution=64, loss_mask={"source": "files"})
    dataset = CaptionedImageDataset(load_examples(config), config, seed=0)
    full, half = dataset[(0, 0)]["loss_mask"], dataset[(1, 0)]["loss_mask"]
    assert (full - half).abs().mean() < 0.02 and half.mean() == pytest.approx(0.5, abs=0.02)  # the same but the edge's blur
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side; upright it is 64x96
    noise(96, 64).save(folder / "0.jpg", exif=exif)
    (folder / "0.png").unlink()
    (folder / "0.txt").write_text("rotated")
    half_mask(96, 64).save(folder / "masks" / "0.PNG")  # made from the stored pixels, not the upright image
    with pytest.raises(FinetuneError, match=r"0.PNG is 96x64 but image .*0.jpg is 64x96 upright: save the mask upright: the image is turned by its EXIF"):
        load_examples(config)


def test_settings_that_would_do_nothing_or_mask_with_the_image_itself_are_refused(make_recipe):
    for loss_mask, message in (
        ({"source": "files", "folder": "./"}, r"data.loss_mask.folder is the image folder itself"),
        ({"source": "alpha", "folder": "cutouts"}, r"data.loss_mask.folder is where source files finds masks; with source alpha it does nothing"),
    ):
        with pytest.raises(FinetuneError, match=message):
            make_recipe(data__loss_mask=loss_mask)
    # source none switches masks off whatever else the section says (an A/B run's one override).
    assert not make_recipe(data__loss_mask={"source": "none", "folder": "cutouts", "unmasked_weight": 0.1}).data.loss_mask.enabled


def test_a_folder_can_train_unmasked_beside_masked_ones(tmp_path):
    root = tmp_path / "data"
    masked_folder(root / "subject", count=2)
    (root / "regularisation").mkdir()
    for i in range(2):
        noise(64, 64, seed=10 + i).save(root / "regularisation" / f"{i}.png")
        (root / "regularisation" / f"{i}.txt").write_text("a photo")
    folders = [{"path": "regularisation", "loss_mask": False}, {"path": "subject", "repeats": 3}]
    config = DataConfig(image_dir=str(root), resolution=64, folders=folders, loss_mask={"source": "files"})
    report = inspect_examples(read_examples(config), config, "data")
    assert not report.findings and "loss masks (files in each folder's masks/): 2 of 4 images masked (unmasked folders: regularisation)" in report.lines()[-1]
    examples = load_examples(config)
    dataset = CaptionedImageDataset(examples, config, seed=0)
    assert [dataset[(i, 0)]["loss_mask"].mean().item() for i in range(8)] == [1.0, 1.0] + [0.5] * 6
    # The preview shows each masked image once (not the unmasked folder, not the repeats), dimmed to the floor.
    strip = np.asarray(preview(dataset, [e.source for e in examples], unmasked_weight=0.0), dtype=np.float32)
    assert strip.shape == (64, 2 * 64, 3)
    assert preview(dataset, [e.source for e in examples][:2], unmasked_weight=0.0) is None  # only the unmasked folder


def test_a_mask_no_view_can_reach_and_alpha_without_any_transparency_stop_before_training(tmp_path):
    folder = masked_folder(tmp_path / "data", count=2, size=(192, 64), mask=lambda width, height: half_mask(width // 4, height).crop((0, 0, width, height)))
    config = DataConfig(image_dir=str(folder), resolution=64, loss_mask={"source": "files"})  # centre crops: x 64-128 of 192
    with pytest.raises(FinetuneError, match=r"image .*0.png: its loss mask is black everywhere in its centre crop to 64x64, so it would train nothing: set data.crop: random"):
        load_examples(config)
    assert len(load_examples(config.model_copy(update={"crop": "random"}))) == 2  # a random crop reaches it at times

    opaque = tmp_path / "opaque"
    opaque.mkdir()
    for i in range(2):
        noise(64, 64, seed=i).save(opaque / f"{i}.png")
        (opaque / f"{i}.txt").write_text("x")
    alpha = DataConfig(image_dir=str(opaque), resolution=64, loss_mask={"source": "alpha"}, skip_bad_images=True)
    with pytest.raises(FinetuneError, match=rf"^data folder {re.escape(str(opaque))}: data.loss_mask.source alpha, and none of its 2 images has transparency, so none is masked: save cut-outs with an alpha channel, or use source files$"):
        load_examples(alpha)
    # One transparent colour (a PNG tRNS chunk) is transparency too: black is transparent here, white opaque.
    keyed = Image.new("RGB", (64, 64), (0, 0, 0))
    keyed.paste((255, 255, 255), (32, 0, 64, 64))
    keyed.save(opaque / "0.png", transparency=(0, 0, 0))
    assert [example.mask_area for example in load_examples(alpha)] == [0.5, None]


def test_review_cases_exact_names_first_8_bit_values_in_16_bits_opaque_alpha_and_16_bit_keyed_images(tmp_path, capsys):
    from finetune.data.images import open_rgb
    from finetune.data.sources import Example

    folder = tmp_path / "data"
    (folder / "masks").mkdir(parents=True)
    for name, left in (("Cat", True), ("cat", False)):  # two images whose names differ in case only
        noise(64, 64).save(folder / f"{name}.jpg")
        (folder / f"{name}.txt").write_text(name)
        mask = half_mask(64, 64)
        (mask if left else mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)).save(folder / "masks" / f"{name}.png")
    config = DataConfig(image_dir=str(folder), resolution=64, loss_mask={"source": "files"})
    dataset = CaptionedImageDataset(load_examples(config), config, seed=0)
    by_name = {Path(example.source).stem: i for i, example in enumerate(dataset.examples)}
    assert dataset[(by_name["Cat"], 0)]["loss_mask"][0, 0, 0] == 1 and dataset[(by_name["cat"], 0)]["loss_mask"][0, 0, 0] == 0

    Image.fromarray(np.array([[0, 255]], dtype=np.uint16)).save(tmp_path / "eight-in-sixteen.png")  # as numpy/OpenCV write 0/255
    assert np.asarray(read_mask_file(tmp_path / "eight-in-sixteen.png")).tolist() == [[0, 255]]

    opaque = tmp_path / "opaque"
    opaque.mkdir()
    noise(64, 64).convert("RGBA").save(opaque / "0.png")  # an alpha channel, opaque everywhere
    (opaque / "0.txt").write_text("x")
    alpha = DataConfig(image_dir=str(opaque), resolution=64, loss_mask={"source": "alpha"})
    with pytest.raises(FinetuneError, match=r"its one image has no transparency, so none is masked"):
        load_examples(alpha)
    # A problem of the whole dataset: skipping images (already on) is not offered as a fix.
    recipe = tmp_path / "alpha.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"pretrained": str(SHIPPED_BASE)}, "data": {"image_dir": str(opaque), "resolution": 64, "loss_mask": {"source": "alpha"}, "skip_bad_images": True}}))
    capsys.readouterr()
    assert main(["check-data", str(recipe)]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "result: training would stop: 1 fatal problem; fix it"
    # Its alpha channel masks nothing, so check-data calls it no loss mask; nor a conversion (compositing changes no pixel).
    converted = [f.message for f in inspect_examples(read_examples(alpha), alpha, "data").findings if f.level == CONVERTED]
    assert converted == []

    ramp = np.linspace(0, 63000, 64 * 64).astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "keyed16.png", transparency=0)  # 16 bits with a transparent value
    pixels = np.asarray(open_rgb(Example(str(tmp_path / "keyed16.png"), "x", lambda: Image.open(tmp_path / "keyed16.png"))))[..., 0]
    assert pixels[0, :4].tolist() == (ramp[0, :4] / 257).astype(np.uint8).tolist() and pixels.max() == 245  # scaled, not clipped


def test_a_dreambooth_concept_can_train_unmasked(make_recipe, tmp_path, monkeypatch):
    cut_outs, style = tmp_path / "subject", tmp_path / "style"
    for folder, transparent in ((cut_outs, True), (style, False)):
        folder.mkdir()
        for i in range(2):
            image = noise(64, 64, seed=i).convert("RGBA")
            if transparent:
                image.putalpha(half_mask(64, 64))
            image.save(folder / f"{i}.png")
    concepts = [{"instance_dir": str(cut_outs), "instance_prompt": "a sks shape"}, {"instance_dir": str(style), "instance_prompt": "in zwx style"}]
    settings = {"concepts": concepts, "prior_preservation": False}
    with pytest.raises(FinetuneError, match=rf"data folder {style}: data.loss_mask.source alpha, and none of its 2 images has transparency.*set dreambooth.concepts.1.loss_mask: false"):
        train(make_recipe(method="dreambooth", dreambooth=settings, data__image_dir=None, data__loss_mask={"source": "alpha"}, train__max_steps=1))
    concepts[1]["loss_mask"] = False
    seen = record_loss_gradients(monkeypatch)
    train(make_recipe(method="dreambooth", dreambooth=settings, data__image_dir=None, data__loss_mask={"source": "alpha"}, train__max_steps=4))
    sums = sorted({float(weights.sum()) for step in seen for weights in step[0]})
    assert sums == [32.0, 64.0]  # masked rows (the subject's left halves) and the style's whole rows
