"""Shared fixtures: a tiny random Stable Diffusion on disk, a small captioned dataset, recipes."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

from finetune.recipe_loading import load_recipe, recipe_from_dict
from finetune.tiny_model import make_tiny_model
from finetune.toyworld.datasets import write_folder


REPO = Path(__file__).resolve().parent.parent
SHIPPED_BASE = REPO / "finetune" / "assets" / "toyworld-base"


@pytest.fixture(scope="session")
def quickstart_lora(tmp_path_factory) -> Path:
    """recipes/quickstart.yaml (about 20 s) on the shipped base: the output folder of a LoRA that draws stars."""
    from finetune.trainer import train

    out = tmp_path_factory.mktemp("quickstart") / "quickstart"
    recipe = load_recipe(
        REPO / "recipes" / "quickstart.yaml",
        [f"output_dir={out}", f"model.pretrained={SHIPPED_BASE}", f"data.image_dir={REPO / 'datasets' / 'star'}",
         "validation.at_start=false", "validation.prompts=[]",
         "checkpoint.every_n_steps=0", "logging.tensorboard=false"],
    )  # fmt: skip
    train(recipe)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-sd") / "model", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_vpred_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-sd-v") / "model", preset="tiny", seed=0, prediction_type="v_prediction")


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """Four striped shapes with .txt captions and a metadata.jsonl."""
    return write_folder(tmp_path_factory.mktemp("data") / "striped", 4, seed=7, include_held_out="only_style")


@pytest.fixture(scope="session")
def pairs_folder(tmp_path_factory) -> Path:
    """ControlNet data: four toy-world images with their shape masks as conditioning (metadata.jsonl names both)."""
    return write_folder(tmp_path_factory.mktemp("pairs") / "pairs", 4, seed=5, conditioning=True)


def build_recipe(tiny_model: Path, image_folder: Path, run_dir: Path, **overrides):
    """A fast LoRA recipe on the tiny model writing to `run_dir` (unless output_dir= is given); keyword
    overrides use dotted names with '__' for '.'."""
    raw = {
        "method": "lora",
        "seed": 3,
        "output_dir": str(run_dir),
        "model": {"pretrained": str(tiny_model)},
        "data": {"image_dir": str(image_folder), "resolution": 64},
        "lora": {"rank": 4, "alpha": 2},
        "train": {"batch_size": 2, "max_steps": 4},
        "optimizer": {"lr": 1e-3},
        "validation": {"prompts": []},
        "checkpoint": {"every_n_steps": 0, "keep_last": 5},
        "logging": {"tensorboard": False},
    }
    for dotted, value in overrides.items():
        node = raw
        keys = dotted.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return recipe_from_dict(raw)


@pytest.fixture
def make_recipe(tiny_model, image_folder, tmp_path):
    """`build_recipe` writing to tmp_path/run unless output_dir= says otherwise."""
    return lambda **overrides: build_recipe(tiny_model, image_folder, tmp_path / "run", **overrides)
