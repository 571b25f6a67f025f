"""Aspect-ratio bucketing: buckets, crops, one-bucket batches, every image once per epoch, and training."""

import math
from dataclasses import replace
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.config import DataConfig
from finetune.data.batches import EpochBatchSampler, make_batch_sampler
from finetune.data.buckets import BucketBatchSampler, assign_buckets, make_buckets, nearest_bucket, split_rows
from finetune.data.items import CaptionedImageDataset, collate
from finetune.data_check.check import inspect_examples
from data_examples import load_examples
from finetune.data.sources import Example, read_examples
from finetune.data.views import ViewPlan, cover_and_center_crop, plan_cover_crop, view_key
from finetune.errors import FinetuneError
from finetune.training.trainer import train

SHAPES = {"wide0": (96, 48), "wide1": (100, 50), "tall0": (48, 96), "tall1": (50, 100), "square": (64, 64)}


def noise_image(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def mixed_folder(tmp_path):
    """Two landscape (2:1), two portrait (1:2) and one square image, with captions."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, (name, (width, height)) in enumerate(SHAPES.items()):
        noise_image(width, height, seed=i).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text("a red striped circle")
    return folder


def bucketed(folder, **extra) -> DataConfig:
    return DataConfig(image_dir=str(folder), resolution=64, bucketing={"enabled": True, "step": 16}, **extra)


def test_buckets_for_sd15_settings():
    buckets = make_buckets(DataConfig(image_dir="x", resolution=512, bucketing={"enabled": True}))
    assert {(512, 512), (448, 576), (576, 448), (384, 640), (640, 384), (256, 1024), (1024, 256)} <= set(buckets)
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert width * height <= 512 * 512
        assert 256 <= min(width, height) and max(width, height) <= 1024
    assert buckets == sorted(buckets, key=lambda b: -b[0] / b[1])  # widest first
    narrow = make_buckets(DataConfig(image_dir="x", resolution=512, bucketing={"enabled": True, "min_side": 384, "max_side": 640}))
    assert all(384 <= side <= 640 for bucket in narrow for side in bucket)


def test_a_huge_max_side_makes_the_same_buckets_at_once():
    """max_side: 10**15 (a typo) looped over every width up to it as the recipe loaded, without a word; no width past
    resolution^2 / min_side has a bucket (its height would be below min_side), so it makes the reachable max_side's buckets."""
    import threading

    made = {}
    huge = lambda: made.setdefault("buckets", make_buckets(DataConfig(image_dir="x", resolution=512, bucketing={"enabled": True, "max_side": 10**15})))
    worker = threading.Thread(target=huge, daemon=True)  # daemon: without the bound it would loop on past the test
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive(), "make_buckets looped over every width up to data.bucketing.max_side"
    reachable = make_buckets(DataConfig(image_dir="x", resolution=512, bucketing={"enabled": True, "max_side": 512 * 512 // 256}))
    assert made["buckets"] == reachable and (1024, 256) in reachable


def test_each_image_goes_to_the_closest_aspect_ratio():
    buckets = make_buckets(DataConfig(image_dir="x", resolution=512, bucketing={"enabled": True}))
    for size in [(1000, 500), (500, 1000), (640, 480), (4000, 4000), (3000, 500)]:
        chosen = nearest_bucket(size, buckets)
        distance = lambda b: abs(math.log(b[0] / b[1]) - math.log(size[0] / size[1]))  # noqa: E731
        assert distance(chosen) == min(distance(b) for b in buckets)
    assert nearest_bucket((4000, 4000), buckets) == (512, 512)
    assert nearest_bucket((1000, 500), buckets)[0] > nearest_bucket((1000, 500), buckets)[1]


def test_images_of_one_size_are_matched_to_a_bucket_once(monkeypatch):
    """20,000 photos of a few cameras: the nearest bucket is looked up per distinct size, not per image (a run
    assigns buckets four times before its first step), and each image still gets its own size's bucket."""
    import finetune.data.buckets as buckets_module

    config = DataConfig(image_dir="x", resolution=512, bucketing={"enabled": True})
    sizes = [(4032, 3024), (3024, 4032), (1024, 1024), (6000, 4000)] * 500
    looked_up = []
    original = buckets_module.nearest_bucket
    monkeypatch.setattr(buckets_module, "nearest_bucket", lambda size, buckets: looked_up.append(size) or original(size, buckets))
    assigned = assign_buckets(sizes, config)
    assert sorted(looked_up) == sorted(set(sizes))
    assert assigned == [original(size, make_buckets(config)) for size in sizes]


def test_cover_and_crop_keeps_aspect_and_records_the_crop():
    image = noise_image(300, 100)
    assert plan_cover_crop(image.size, (128, 64), "center", None) == ((192, 64), (0, 32))  # resized to 192x64, centre cut
    expected = image.resize((192, 64), Image.Resampling.LANCZOS).crop((32, 0, 160, 64))
    assert np.array_equal(np.asarray(cover_and_center_crop(image, (128, 64))), np.asarray(expected))
    offsets = {plan_cover_crop(image.size, (128, 64), "random", np.random.default_rng(s))[1] for s in range(20)}
    assert len(offsets) > 3 and all(top == 0 and 0 <= left <= 64 for top, left in offsets)


def test_dataset_items_have_their_bucket_size_original_size_and_crop(mixed_folder):
    config = bucketed(mixed_folder)
    examples = load_examples(config)
    dataset = CaptionedImageDataset(examples, config, seed=0)
    names = [e.source.rsplit("/", 1)[-1][:-4] for e in examples]
    expected = {"wide0": (80, 48), "wide1": (80, 48), "tall0": (48, 80), "tall1": (48, 80), "square": (64, 64)}
    assert dict(zip(names, dataset.bucket_of)) == expected
    for index, name in enumerate(names):
        item = dataset[(index, 0)]
        width, height = expected[name]
        assert item["pixel_values"].shape == (3, height, width)
        assert item["original_size"] == (SHAPES[name][1], SHAPES[name][0])  # (height, width)
    # wide1 (100x50) is scaled to 96x48 to cover 80x48, then cut in the middle: 8 px from the left.
    assert dataset[(names.index("wide1"), 0)]["crop_top_left"] == (0, 8)
    batch = collate([dataset[(names.index(n), 0)] for n in ("wide0", "wide1")])
    assert batch["pixel_values"].shape == (2, 3, 48, 80)
    assert batch["original_size"].tolist() == [[48, 96], [50, 100]]


def test_without_bucketing_everything_is_a_square_as_before(mixed_folder):
    config = DataConfig(image_dir=str(mixed_folder), resolution=64)
    dataset = CaptionedImageDataset(load_examples(config), config, seed=0)
    assert dataset.bucket_of is None
    assert all(dataset[(i, 0)]["pixel_values"].shape == (3, 64, 64) for i in range(len(dataset)))
    sampler = make_batch_sampler(dataset, 2, 1, 0, seed=4)
    assert isinstance(sampler, EpochBatchSampler)
    assert list(islice(sampler, 7)) == list(islice(EpochBatchSampler(len(dataset), 2, 1, 0, seed=4), 7))
    assert sampler.rows_of(3) == (2, slice(0, 2))


def run_epochs(sampler, epochs):
    stream = iter(sampler)
    return [[next(stream) for _ in range(sampler.batches_per_epoch)] for _ in range(epochs)]


def test_every_image_once_per_epoch_and_one_bucket_per_batch():
    bucket_of = [(80, 48)] * 7 + [(64, 64)] * 3 + [(48, 80)] * 1
    sampler = BucketBatchSampler(bucket_of, batch_size=3, num_processes=1, process_index=0, seed=2)
    assert sampler.batches_per_epoch == 3 + 1 + 1  # ceil(7/3) + ceil(3/3) + ceil(1/3)
    orders = []
    for epoch, batches in enumerate(run_epochs(sampler, 3)):
        seen = [index for batch in batches for index, batch_epoch in batch if batch_epoch == epoch]
        assert sorted(seen) == list(range(11))  # exactly once each: no drop, no repeat
        for batch in batches:
            assert len({bucket_of[index] for index, _ in batch}) == 1
        assert sorted(len(b) for b in batches) == [1, 1, 3, 3, 3]  # smaller last batch per bucket, never dropped
        orders.append(seen)
    assert orders[0] != orders[1]  # reshuffled per epoch
    assert run_epochs(BucketBatchSampler(bucket_of, 3, 1, 0, seed=2), 3) == run_epochs(sampler, 3)  # deterministic


def test_bucket_sampler_resumes_and_splits_across_processes():
    bucket_of = [(80, 48)] * 5 + [(64, 64)] * 4 + [(48, 80)] * 1
    full = iter(BucketBatchSampler(bucket_of, 2, 1, 0, seed=1))
    batches = [next(full) for _ in range(13)]
    resumed = iter(BucketBatchSampler(bucket_of, 2, 1, 0, seed=1, start=7))
    assert [next(resumed) for _ in range(6)] == batches[7:]

    one = BucketBatchSampler(bucket_of, 4, 1, 0, seed=3)
    ranks = [BucketBatchSampler(bucket_of, 2, 2, r, seed=3) for r in range(2)]
    streams = [iter(s) for s in (one, *ranks)]
    for micro_batch in range(2 * one.batches_per_epoch):
        whole, first, second = (next(s) for s in streams)
        if len(whole) >= 2:
            assert whole == first + second
        else:  # a bucket's last, single image: the second process borrows one of the same bucket
            assert first == whole and bucket_of[second[0][0]] == bucket_of[whole[0][0]]
        assert first and second
        size, rows = ranks[1].rows_of(micro_batch)
        assert size == max(len(whole), 2) and rows == split_rows(size, 2, 1)


def test_split_rows_is_contiguous_and_even():
    assert [split_rows(5, 2, r) for r in range(2)] == [slice(0, 3), slice(3, 5)]
    assert [split_rows(8, 2, r) for r in range(2)] == [slice(0, 4), slice(4, 8)]
    with pytest.raises(FinetuneError, match="fewer than the 3 processes"):
        BucketBatchSampler([(64, 64)] * 2, 1, 3, 0, seed=0)


def test_bucket_settings_are_validated():
    with pytest.raises(ValueError, match=r"data.resolution \(72\) must be a multiple of data.bucketing.step \(16\)"):
        DataConfig(image_dir="x", resolution=72, bucketing={"enabled": True, "step": 16})
    with pytest.raises(ValueError, match="must be a positive multiple of 8"):
        DataConfig(image_dir="x", bucketing={"step": 12})
    with pytest.raises(ValueError, match="max_side"):
        DataConfig(image_dir="x", resolution=512, bucketing={"enabled": True, "max_side": 448})


def test_cache_key_includes_the_crop_size():
    plan = ViewPlan(resized=(80, 80), top_left=(0, 0), target=(80, 48), flip=False)
    assert view_key("digest", plan) == view_key("digest", ViewPlan((80, 80), (0, 0), (80, 48), False))
    assert view_key("digest", plan) != view_key("digest", replace(plan, target=(48, 80)))  # another bucket
    assert view_key("digest", plan) != view_key("digest", replace(plan, flip=True))
    assert view_key("digest", plan) != view_key("other image", plan)


def record_batches(monkeypatch):
    """Wrap the LoRA loss to record each batch's indices and pixel shape."""
    from finetune.methods.lora import LoRAMethod

    seen, original = [], LoRAMethod.loss

    def loss(self, modules, batch, randomness):
        seen.append((batch["indices"].tolist(), tuple(batch["pixel_values"].shape[-2:])))
        return original(self, modules, batch, randomness)

    monkeypatch.setattr(LoRAMethod, "loss", loss)
    return seen


def test_mixed_aspect_ratios_train_with_buckets(make_recipe, mixed_folder, monkeypatch, capsys):
    seen = record_batches(monkeypatch)
    data = {"image_dir": str(mixed_folder), "resolution": 64, "bucketing": {"enabled": True, "step": 16}}
    result = train(make_recipe(data=data, train__max_steps=6, train__batch_size=2))  # 2 epochs of 3 batches
    assert len(result.losses) == 6 and all(np.isfinite(result.losses))
    examples = load_examples(bucketed(mixed_folder))
    bucket_of = CaptionedImageDataset(examples, bucketed(mixed_folder), seed=3).bucket_of
    for epoch in range(2):
        batches = seen[3 * epoch : 3 * epoch + 3]
        assert sorted(i for indices, _ in batches for i in indices) == list(range(5))  # every image once
        for indices, (height, width) in batches:
            assert {bucket_of[i] for i in indices} == {(width, height)}  # trained at its bucket's size
    assert {shape for _, shape in seen} == {(48, 80), (80, 48), (64, 64)}
    out = capsys.readouterr().out
    assert "buckets (width x height: images): 80x48: 2, 64x64: 1, 48x80: 2" in out
    assert "5 images, 5 used, 0 skipped" in out


def test_an_accumulated_step_of_uneven_batches_weighs_every_image_alike(make_recipe, mixed_folder, monkeypatch):
    """One step of an epoch's three bucket batches (2, 1 and 2 images): its gradient and its loss are those of the mean
    over the 5 images, as one batch of them all would give, not the mean of the 3 batches' means (the lone image of
    the square bucket counted as much as each pair)."""
    from accelerate import Accelerator

    import finetune.methods.base as base

    per_image, backward_losses = [], []
    original_loss, original_backward = base.per_sample_loss, Accelerator.backward
    monkeypatch.setattr(base, "per_sample_loss", lambda *args, **kw: per_image.append(original_loss(*args, **kw)) or per_image[-1])
    monkeypatch.setattr(Accelerator, "backward", lambda self, loss, **kw: backward_losses.append(loss.item()) or original_backward(self, loss, **kw))
    data = {"image_dir": str(mixed_folder), "resolution": 64, "bucketing": {"enabled": True, "step": 16}}
    result = train(make_recipe(data=data, train__max_steps=1, train__batch_size=2, train__gradient_accumulation_steps=3))
    assert sorted(len(losses) for losses in per_image) == [1, 2, 2]
    mean = torch.cat(per_image).mean().item()
    assert sum(backward_losses) / 3 == pytest.approx(mean, rel=1e-5)  # accelerate divides each by the accumulation
    assert result.losses[0] == pytest.approx(mean, rel=1e-5)


def test_cached_latents_match_uncached_with_buckets(make_recipe, mixed_folder, tmp_path):
    data = {"image_dir": str(mixed_folder), "resolution": 64, "bucketing": {"enabled": True, "step": 16}}
    common = dict(data=data, train__max_steps=6, train__batch_size=2)  # two epochs: the second reads the cache
    plain = train(make_recipe(output_dir=str(tmp_path / "plain"), **common))
    cache_dir = tmp_path / "cache"
    cached = train(make_recipe(output_dir=str(tmp_path / "cached"), train__cache_latents=True, train__cache_dir=str(cache_dir), **common))
    assert torch.allclose(torch.tensor(plain.losses), torch.tensor(cached.losses), rtol=1e-5, atol=1e-6)
    entries = list(cache_dir.glob("latents-*/*.safetensors"))
    assert len(entries) == 5  # one per image at its own bucket size, reused in epoch 2


def test_repeats_are_counted_per_bucket(tmp_path):
    folder = tmp_path / "data"
    (folder / "wide").mkdir(parents=True)
    noise_image(96, 48).save(folder / "wide" / "a.png")
    noise_image(64, 64, seed=1).save(folder / "b.png")
    config = bucketed(folder, caption="x", folders=[{"path": "wide", "repeats": 3}, {"path": "."}])
    dataset = CaptionedImageDataset(load_examples(config), config, seed=0)
    assert Counter(dataset.bucket_of) == {(80, 48): 3, (64, 64): 1}
    assert isinstance(make_batch_sampler(dataset, 2, 1, 0, seed=0), BucketBatchSampler)


def test_dreambooth_class_images_take_their_instance_images_bucket(tmp_path):
    from finetune.config.recipe_loading import recipe_from_dict
    from finetune.dreambooth.data import DreamBoothDataset, dreambooth_collate

    for i, (width, height) in enumerate([(96, 48), (48, 96)]):
        noise_image(width, height, seed=i).save(tmp_path / f"{i}.png")
    recipe = recipe_from_dict({
        "method": "dreambooth",
        "data": {"resolution": 64, "bucketing": {"enabled": True, "step": 16}},
        "dreambooth": {"concepts": [{"instance_dir": str(tmp_path), "instance_prompt": "sks", "class_prompt": "a thing"}]},
    })
    config = recipe.data.model_copy(update={"image_dir": str(tmp_path), "caption": "sks"})
    instances = [(0, example) for example in load_examples(config)]
    square = Example("class.png", "a thing", lambda: noise_image(64, 64, seed=9))
    dataset = DreamBoothDataset(instances, [[square]], recipe)
    for index, expected in enumerate([(48, 80), (80, 48)]):
        batch = dreambooth_collate([dataset[(index, 0)]])
        assert batch["pixel_values"].shape == (2, 3, *expected)  # instance and class image stack


def test_controlnet_pairs_are_bucketed_with_one_geometry_and_train(make_recipe, mixed_folder):
    """Each conditioning image is its image with the channels reversed: any crop, flip or resize that
    differed between the two would break the equality."""
    import json

    from finetune.methods.controlnet import ControlNetMethod

    (mixed_folder / "conditioning").mkdir()
    with open(mixed_folder / "metadata.jsonl", "w") as metadata:
        for name in SHAPES:
            pixels = np.asarray(Image.open(mixed_folder / f"{name}.png"))
            Image.fromarray(np.ascontiguousarray(pixels[..., ::-1])).save(mixed_folder / "conditioning" / f"{name}.png")
            metadata.write(json.dumps({"file_name": f"{name}.png", "conditioning_file_name": f"conditioning/{name}.png", "text": "a shape"}) + "\n")
    recipe = make_recipe(
        method="controlnet", data__image_dir=str(mixed_folder), data__bucketing={"enabled": True, "step": 16},
        data__crop="random", data__random_flip=True, train__batch_size=2, train__max_steps=3,
    )  # fmt: skip
    method = ControlNetMethod(recipe)
    method.check_data()
    dataset, collate_fn = method.training_data(None)
    for index, pair in enumerate(dataset.pairs):
        width, height = dataset.bucket_of[index]
        assert (width > height) == (pair.image.size[0] > pair.image.size[1]), pair.image.source  # its own shape
        for epoch in range(3):
            item = dataset[(index, epoch)]
            assert item["pixel_values"].shape == (3, height, width)
            image_levels = ((item["pixel_values"] + 1) * 127.5).round()
            assert torch.equal((item["conditioning_pixel_values"] * 255).round(), image_levels.flip(0))
    result = train(recipe)
    assert len(result.losses) == 3 and all(math.isfinite(loss) for loss in result.losses)


def test_no_upscale_trains_small_images_at_their_own_size(make_recipe, tmp_path, monkeypatch, capsys):
    """sd-scripts' bucket_no_upscale: an image keeps its shape at its own size (of at most resolution^2
    pixels: a larger one is shrunk to that), sides rounded down to the step; nothing is enlarged."""
    folder = tmp_path / "small"
    folder.mkdir()
    for i, (width, height) in enumerate([(60, 40), (60, 40), (40, 60), (40, 60), (100, 50), (100, 50)]):
        noise_image(width, height, seed=i).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a red striped circle")
    config = DataConfig(image_dir=str(folder), resolution=64, bucketing={"enabled": True, "step": 16, "no_upscale": True})
    report_lines = "\n".join(inspect_examples(read_examples(config), config, "data").lines())
    # 100x50 has 5000 pixels > 64^2: shrunk to them as sd-scripts rounds (64x32, the ratio kept).
    assert "buckets (width x height: images): 64x32: 2, 48x32: 2, 32x48: 2" in report_lines and "upscaled" not in report_lines
    plain = config.model_copy(update={"bucketing": config.bucketing.model_copy(update={"no_upscale": False})})
    assert CaptionedImageDataset(load_examples(plain), plain, seed=0).bucket_of[:4] == [(80, 48), (80, 48), (48, 80), (48, 80)]  # enlarged
    seen = record_batches(monkeypatch)
    data = {"image_dir": str(folder), "resolution": 64, "bucketing": {"enabled": True, "step": 16, "no_upscale": True}}
    result = train(make_recipe(data=data, train__max_steps=3, train__batch_size=2))
    assert all(np.isfinite(result.losses)) and {shape for _, shape in seen} == {(32, 48), (48, 32), (32, 64)}  # (height, width)
    # At 512, the sizes sd-scripts' bucket_no_upscale gives (its BucketManager, worked by hand).
    sd15 = DataConfig(image_dir="x", resolution=512, bucketing={"enabled": True, "no_upscale": True})
    assert assign_buckets([(4000, 3000), (700, 380), (600, 400)], sd15) == [(512, 384), (576, 320), (576, 384)]
    for bucketing, message in (({"no_upscale": True}, r"no_upscale sizes buckets: set data.bucketing.enabled"),
                               ({"enabled": True, "no_upscale": True, "max_side": 128}, r"min_side and max_side do not apply with no_upscale")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            DataConfig(image_dir=str(folder), resolution=64, bucketing=bucketing)


def test_no_upscale_advice_names_only_a_step_there_is(tmp_path):
    # "lower it" was said at a step of 8, the smallest there is, and without saying how low a step keeps the image.
    folder = tmp_path / "thin"
    folder.mkdir()
    noise_image(60, 12).save(folder / "strip.png")
    noise_image(60, 4, seed=1).save(folder / "line.png")
    for name in ("strip", "line"):
        (folder / f"{name}.txt").write_text("a red striped circle")

    def upscaled_lines(step):
        config = DataConfig(image_dir=str(folder), resolution=64, min_image_size=1, bucketing={"enabled": True, "step": step, "no_upscale": True})
        return sorted(line for line in inspect_examples(read_examples(config), config, "data").lines() if "upscaled" in line)

    line, strip = upscaled_lines(16)
    assert strip.endswith("(data.bucketing.no_upscale keeps no side shorter than the step, 16: lower it to 8 or less to keep this image's size)"), strip
    assert line.endswith("(data.bucketing.no_upscale keeps no side shorter than 8 pixels, the smallest step: use a larger copy of this image, or leave it out)"), line
    assert upscaled_lines(8) == [line]  # at a step of 8, 60x12 keeps its own size (56x8); 60x4 cannot
