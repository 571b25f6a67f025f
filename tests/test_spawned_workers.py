"""Data-loader workers as macOS and Windows start them: spawned, not forked (Python's default start method there). The
training set, its collate function and the worker_init_fn are pickled into fresh processes that import finetune again;
an image's loader was a lambda ("Can't pickle local object '_images_of_folder.<locals>.<lambda>'"), so every run with
data.num_workers > 0 (recipes/lora.yaml and controlnet.yaml ship 2) stopped at its first step there."""

import json
import multiprocessing
import pickle
from pathlib import Path

import datasets
import pytest
import torch
import worker_batches
from conftest import REPO, build_recipe
from worker_batches import first_batch, model_libraries_loaded

from finetune.training.trainer import train
import finetune.training.trainer as trainer

STAR = REPO / "datasets" / "star"  # 64 px images with loss masks in masks/


class Captured(Exception):
    """Raised where the trainer would build its loader: what it would have been given."""


def same(a, b) -> bool:
    """Equal batches: their tensors of the same values, dtype and shape, the rest equal."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def loader_inputs(recipe, monkeypatch) -> tuple:
    """(training set, the first micro-batch's item keys, collate function) as the trainer builds them for `recipe`."""

    def capture(dataset, sampler, collate_fn, num_workers, seed):
        raise Captured(dataset, next(iter(sampler)), collate_fn)

    monkeypatch.setattr(trainer, "training_loader", capture)
    with pytest.raises(Captured) as captured:
        train(recipe)
    return captured.value.args


def saved_dataset(folder: Path) -> Path:
    records = [json.loads(line) for line in (STAR / "metadata.jsonl").read_text().splitlines()]
    images = [str(STAR / record["file_name"]) for record in records]
    data = datasets.Dataset.from_dict({"image": images, "text": [r["text"] for r in records]}).cast_column("image", datasets.Image())
    data.save_to_disk(folder)
    return folder


DATA_PATHS = {
    "folder, buckets, augmentations, loss masks, held-out images": dict(
        data__image_dir=str(STAR), data__bucketing={"enabled": True, "step": 16, "min_side": 32, "max_side": 96}, data__crop="random",
        data__random_flip=True, data__shuffle_tags=True, data__caption_dropout=0.3, data__loss_mask={"source": "files", "folder": "masks"},
        validation__loss_images=1),
    "cached latents and embeddings": dict(data__image_dir=str(STAR), train__cache_latents=True, train__cache_text_embeddings=True),
    "datasets dataset": dict(data__image_dir=None, data__dataset="saved"),
    "dreambooth with class images": dict(
        method="dreambooth", data__image_dir=None, train__batch_size=1,
        dreambooth={"concepts": [{"instance_dir": str(STAR), "instance_prompt": "a sks star", "class_prompt": "a shape",
                                  "class_dir": str(REPO / "datasets" / "striped")}], "num_class_images": 2}),  # a user's own class images
    "controlnet": dict(method="controlnet", data__image_dir="pairs"),
}


@pytest.fixture(scope="module")
def spawned_worker():
    """One spawned process, as a DataLoader worker on macOS or Windows: a fresh interpreter given pickled inputs."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        yield pool


@pytest.mark.parametrize("path", DATA_PATHS)
def test_each_data_path_gives_a_spawned_worker_the_batch_it_gives_here(path, tiny_model, pairs_folder, tmp_path, monkeypatch, spawned_worker):
    overrides = dict(DATA_PATHS[path])
    if overrides.get("data__dataset") == "saved":
        overrides["data__dataset"] = str(saved_dataset(tmp_path / "saved"))
    if overrides.get("data__image_dir") == "pairs":
        overrides["data__image_dir"] = str(pairs_folder)
    recipe = build_recipe(tiny_model, STAR, tmp_path / "run", data__num_workers=2, **overrides)
    dataset, keys, collate_fn = loader_inputs(recipe, monkeypatch)
    here = first_batch(dataset, keys, collate_fn)
    there = spawned_worker.apply(first_batch, (dataset, keys, collate_fn))  # pickled there and back, as a worker's are
    assert len(pickle.dumps(dataset)) < 100_000  # items' sources and settings, not images or encodings
    assert same(there, here)  # nothing in the worker reads settings made here alone
    # The dataset's module, imported by each worker, is the data's alone: DreamBooth's imported diffusers, transformers,
    # peft and bitsandbytes into every worker (seconds each), which printed the warnings the command line silences.
    assert spawned_worker.apply(model_libraries_loaded) == []


@pytest.fixture
def spawn_by_default():
    """Python's default start method on macOS and Windows, for this test."""
    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("spawn", force=True)
    yield
    multiprocessing.set_start_method(before, force=True)


def test_a_run_trains_with_spawned_data_workers(make_recipe, spawn_by_default, tmp_path, monkeypatch):
    import finetune.data.loader

    # Each worker notes whether it has this process's memory: a run whose workers were forked (or that started none)
    # passed here as well.
    monkeypatch.setattr(worker_batches, "IN_THE_TEST_PROCESS", True)
    monkeypatch.setattr(finetune.data.loader, "leave_stop_signals_to_the_trainer", worker_batches.noting_how_it_started)
    notes = tmp_path / "worker-notes"
    notes.mkdir()
    monkeypatch.setenv(worker_batches.WORKER_NOTES, str(notes))
    recipe = make_recipe(data__image_dir=str(STAR), data__num_workers=1, train__max_steps=2, data__random_flip=True,
                         data__loss_mask={"source": "files", "folder": "masks"})  # fmt: skip
    result = train(recipe)
    assert result.final_step == 2 and len(result.losses) == 2
    in_the_test_process = [json.loads(note.read_text()) for note in notes.iterdir()]
    assert in_the_test_process and not any(in_the_test_process)  # workers started, each spawned
