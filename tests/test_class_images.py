"""DreamBooth's class images: exactly the missing ones made, resumably and identically; a list of class prompts
taken in turn; batches that run out of GPU memory made again in halves."""

import pytest
import torch
from PIL import Image

from finetune.config import ClassImageGeneration, ModelConfig
from finetune.dreambooth.class_image_names import class_image_caption, generation_record, record_key
from finetune.dreambooth.class_image_plans import plan_class_images
from finetune.dreambooth.class_images import generate_class_images
from finetune.models.loading import load_base_model
from finetune.sampling.pipelines import build_pipeline

SETTINGS = ClassImageGeneration(num_inference_steps=2, guidance_scale=3.0, batch_size=2, seed=5)
BASE = ModelConfig(pretrained="some/base")


def generation_key(class_prompts, settings, resolution, model, mixed_precision="no") -> str:
    """The name prefix of the class images these settings make (training's: class_image_plans.class_image_plans)."""
    return record_key(generation_record(class_prompts, settings, resolution, model, mixed_precision))


def test_generation_makes_exactly_the_missing_images_and_resumes(tiny_model, tmp_path):
    folder = tmp_path / "class"
    folder.mkdir()
    for name in ("mine-a.png", "mine-b.png"):
        Image.new("RGB", (64, 64), "red").save(folder / name)
    key = generation_key(["a shape"], SETTINGS, 64, BASE)
    paths, missing = plan_class_images(folder, key, wanted=5)
    assert missing == [0, 1, 2] and [p.name for p in paths[:2]] == ["mine-a.png", "mine-b.png"]

    pipeline = build_pipeline(load_base_model(_model(tiny_model)))
    # One at a time: a batch's size changes the rounding of a CPU's matrix kernels (on some CPUs), and so the bytes compared.
    one_at_a_time = SETTINGS.model_copy(update={"batch_size": 1})
    assert generate_class_images(pipeline, ["a shape"], folder, key, missing, one_at_a_time, 64) == 3
    first_run = {p.name: p.read_bytes() for p in folder.glob(f"{key}-*.png")}
    assert len(first_run) == 3

    # An interrupted generation: one image never got written. Only that one is made, identically.
    (folder / f"{key}-00001.png").unlink()
    _, missing = plan_class_images(folder, key, wanted=5)
    assert missing == [1]
    assert generate_class_images(pipeline, ["a shape"], folder, key, missing, one_at_a_time, 64) == 1
    assert {p.name: p.read_bytes() for p in folder.glob(f"{key}-*.png")} == first_run

    # Another class prompt never counts these images, nor does another base model (or its other revision or weights variant).
    other = generation_key(["a dog"], SETTINGS, 64, BASE)
    _, missing_other = plan_class_images(folder, other, wanted=5)
    assert missing_other == [0, 1, 2]
    for model in (ModelConfig(pretrained="other/base"), BASE.model_copy(update={"revision": "v2"}), BASE.model_copy(update={"clip_skip": 2}),
                  BASE.model_copy(update={"variant": "fp16"})):  # fmt: skip
        assert generation_key(["a shape"], SETTINGS, 64, model) != key
    assert generation_key(["a shape"], SETTINGS, 64, BASE, "bf16") != key  # nor images sampled in another precision
    same_folder = (ModelConfig(pretrained=str(tiny_model)), ModelConfig(pretrained=str(tiny_model / ".." / tiny_model.name)))
    assert len({generation_key(["a shape"], SETTINGS, 64, model) for model in same_folder}) == 1
    # Fewer wanted than the user brought: the first ones by name, nothing generated.
    paths, missing = plan_class_images(folder, key, wanted=1)
    assert [p.name for p in paths] == ["mine-a.png"] and missing == []


def test_a_list_of_class_prompts_makes_image_k_from_prompt_k_mod_n_and_trains_it_with_that_prompt(tiny_model, tmp_path):
    prompts = ["a shape", "a shape on a blue background", "a shape, top left"]
    one_at_a_time = SETTINGS.model_copy(update={"batch_size": 1})  # batch size must not change the pixels compared
    key = generation_key(prompts, one_at_a_time, 64, BASE)
    assert key != generation_key(prompts[:1], one_at_a_time, 64, BASE) != generation_key(prompts[::-1], one_at_a_time, 64, BASE)
    folder = tmp_path / "class"
    pipeline = build_pipeline(load_base_model(_model(tiny_model)))
    assert generate_class_images(pipeline, prompts, folder, key, [0, 1, 2, 3, 4], one_at_a_time, 64) == 5

    # Image 4 is prompt 4 mod 3 = 1 with seed 5 + 4: the same pixels as that prompt alone at index 4.
    single = generation_key(prompts[1:2], one_at_a_time, 64, BASE)
    generate_class_images(pipeline, prompts[1:2], tmp_path / "single", single, [4], one_at_a_time, 64)
    assert (folder / f"{key}-00004.png").read_bytes() == (tmp_path / "single" / f"{single}-00004.png").read_bytes()
    assert (folder / f"{key}-00004.png").read_bytes() != (folder / f"{key}-00003.png").read_bytes()

    captions = [class_image_caption(folder / f"{key}-{k:05d}.png", prompts) for k in range(5)]
    assert captions == [prompts[0], prompts[1], prompts[2], prompts[0], prompts[1]]
    assert class_image_caption(folder / "my-own-dog.png", prompts) == prompts[0]


def test_class_images_out_of_gpu_memory_are_made_in_halves(tiny_model, tmp_path, capsys):
    """dreambooth.class_generation.batch_size: 1000000 had one call hold every missing image; out of GPU memory was a
    traceback once the base had loaded. A batch that does not fit is made again in halves (image k comes from seed + k in
    any batch), and the smaller size kept; one image that does not fit still raises."""
    pipeline = build_pipeline(load_base_model(_model(tiny_model)))
    tried = []

    class SmallGpu:  # the pipeline on a GPU that holds `fits` images at once
        def __init__(self, fits):
            self.fits = fits

        def __getattr__(self, name):
            return getattr(pipeline, name)

        def __call__(self, **kwargs):
            tried.append(len(kwargs["generator"]))
            if len(kwargs["generator"]) > self.fits:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return pipeline(**kwargs)

    huge = SETTINGS.model_copy(update={"batch_size": 1_000_000})
    assert generate_class_images(SmallGpu(2), ["a shape"], tmp_path / "class", "k", [0, 1, 2, 3, 4], huge, 64) == 5
    assert tried == [5, 2, 2, 1]  # five fail, then two at a time (the last one alone)
    assert sorted(p.name for p in (tmp_path / "class").glob("*.png")) == [f"k-{k:05d}.png" for k in range(5)]
    assert "class images: 5 at once ran out of GPU memory; making 2 at a time from now on" in capsys.readouterr().out
    with pytest.raises(torch.OutOfMemoryError):  # one image that does not fit: nothing smaller to try
        generate_class_images(SmallGpu(0), ["a shape"], tmp_path / "other", "k", [0, 1], huge, 64)


def _model(path):
    return ModelConfig(pretrained=str(path))


def test_class_images_that_decode_to_nan_stop_the_run_before_any_is_written(tiny_model, tmp_path):
    """At a guidance far too high the images came out black (NaN made into pixels) and trained the class prior on black."""
    from finetune.errors import FinetuneError

    folder, settings = tmp_path / "class", SETTINGS.model_copy(update={"guidance_scale": 1e30})
    key = generation_key(["a shape"], settings, 64, BASE)
    pipeline = build_pipeline(load_base_model(_model(tiny_model)))
    with pytest.raises(FinetuneError) as error:
        generate_class_images(pipeline, ["a shape"], folder, key, [0, 1], settings, 64)
    assert str(error.value) == ("class images of the class prompt 'a shape' decoded to NaN or inf (black), at dreambooth.class_generation.guidance_scale "
                                f"1e+30: lower it (7.5 is usual); none of them was written to {folder}, and the next run continues its class images")  # fmt: skip
    assert list(folder.glob("*.png")) == [] and plan_class_images(folder, key, wanted=2)[1] == [0, 1]
