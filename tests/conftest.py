"""Shared fixtures: a tiny random Stable Diffusion on disk, a small captioned dataset, recipes, the launched demo."""

from __future__ import annotations

import hashlib
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread in the interpreters the tests start (`python -m finetune`, killed runs, bench variants), as the worker
# itself runs (test modules pin torch.set_num_threads(1)) and as every launch here asks already: CI's 2 cores run 2 pytest
# workers, and a child of one with 2 threads spun on the core the other worker had, which cost it more CPU, not less time
# (measured: a loader-worker run's child 28 s -> 18 s). A test that wants more threads sets them itself.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Every DeepSpeed launch builds DeepSpeed's shared-memory op (about a minute of 2 cores; test_library_noise's and
# test_deepspeed_zero2's launches wait on one build) into torch's extensions folder, which is one per user and Python
# version, shared by every virtual environment. Another environment on the machine (another clone's .venv) compiles it
# with its own include paths, so each one's test run rebuilt what the other had built. The tests keep a folder per
# environment (a TORCH_EXTENSIONS_DIR that is set is kept).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch_extensions",
    f"finetune-tests-{hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]}"))  # fmt: skip

from finetune.library_noise import quiet_third_party_warnings

# As the command line does: pytest-xdist's workers import the libraries before any capture, and their import-time
# warnings (bitsandbytes' CPU kernels, CLIP's image processor without torchvision) printed after the suite's summary.
# (tests/test_cli.py checks the command line's own filtering in an interpreter of its own.)
quiet_third_party_warnings()

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from ports import free_port

from finetune.config import LoRAConfig
from finetune.config.recipe_loading import load_recipe, recipe_from_dict
from finetune.models.tiny_model import make_tiny_model
from finetune.toyworld.datasets import write_folder


REPO = Path(__file__).resolve().parent.parent
SHIPPED_BASE = REPO / "finetune" / "assets" / "toyworld-base"


@pytest.fixture(autouse=True)
def no_accelerate_settings_left():
    """A test that made an Accelerator of its own and left accelerate's process-wide settings set failed a later test of
    another precision in its worker ("AcceleratorState has already been initialized"), an order that --dist loadfile
    changes with the files collected. Such a test fails here instead, and the settings are cleared for the next."""
    yield
    state = sys.modules.get("accelerate.state")
    if state is not None and state.AcceleratorState._shared_state:
        from finetune.training.accelerate_state import clear_accelerate_settings

        clear_accelerate_settings()
        pytest.fail("the test left accelerate's AcceleratorState set: clear it (finetune.training.accelerate_state.clear_accelerate_settings)")


def made_once_per_run(tmp_path_factory, name: str, make) -> Path:
    """`make(folder)` once for the whole pytest run, its folder read by every xdist worker: a session fixture is made once
    per worker, and `--dist loadfile` puts the files using it on both workers. The worker that comes second waits for
    the first one's folder (a file lock in the run's base folder, which the workers share); after a failed attempt the
    next worker tries again in a folder of its own."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:  # no workers: the base folder's parent holds earlier runs
        folder = tmp_path_factory.mktemp(name) / name
        make(folder)
        return folder
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / f"shared-{name}"
    shared.mkdir(exist_ok=True)
    with FileLock(str(shared / "lock")):
        made = shared / "made"
        if not made.is_file():
            folder = shared / worker / name
            make(folder)
            made.write_text(str(folder))
        return Path(made.read_text())


@pytest.fixture(scope="session")
def quickstart_lora(tmp_path_factory) -> Path:
    """recipes/quickstart.yaml (about 20 s) on the shipped base: the output folder of a LoRA that draws stars. Made
    once per run (three files use it); its folder holds that LoRA alone."""
    from finetune.training.trainer import train

    def make(out: Path) -> None:
        train(load_recipe(
            REPO / "recipes" / "quickstart.yaml",
            [f"output_dir={out}", f"model.pretrained={SHIPPED_BASE}", f"data.image_dir={REPO / 'datasets' / 'star'}",
             "validation.at_start=false", "validation.prompts=[]",
             "checkpoint.every_n_steps=0", "logging.tensorboard=false"],
        ))  # fmt: skip

    return made_once_per_run(tmp_path_factory, "quickstart", make)


@pytest.fixture(scope="session")
def base_star_share(tmp_path_factory) -> float:
    """The share of stars the shipped base draws (tests/star_share.py, about 7 s): drawn once per run, as the two files
    asking for it (test_toyworld_base, test_quickstart) often run on different workers."""
    from star_share import star_share

    def make(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "share.json").write_text(json.dumps(float(star_share(None))))

    return json.loads((made_once_per_run(tmp_path_factory, "base-star-share", make) / "share.json").read_text())


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
    if raw["method"] == "lora" or (raw.get("dreambooth") or {}).get("adapter") == "lora":  # a method training none refuses lora settings
        raw["lora"] = {"rank": 4, "alpha": 2, **raw.get("lora", {})}
    return recipe_from_dict(raw)


@pytest.fixture
def make_recipe(tiny_model, image_folder, tmp_path):
    """`build_recipe` writing to tmp_path/run unless output_dir= says otherwise."""
    return lambda **overrides: build_recipe(tiny_model, image_folder, tmp_path / "run", **overrides)


@pytest.fixture(scope="session")
def adapters_dir(tmp_path_factory, tiny_model, image_folder) -> Path:
    """The demo's adapters folder (tests/test_demo.py): what the trainer and the other commands write (a LoRA
    trained for 2 steps, its kohya export, a ControlNet, a DreamBooth pipeline) plus what must be refused or
    must not fit (a pickle file, a LoRA of another base)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from finetune.formats.kohya import load_lora, save_lora_file
    from finetune.outputs.pipeline_io import save_model_folder
    from finetune.methods.lora import add_lora, save_lora
    from finetune.models.tiny_model import build_tiny_pipeline, make_tiny_model
    from finetune.training.trainer import train

    root = tmp_path_factory.mktemp("adapters")
    train(recipe_from_dict({
        "method": "lora", "seed": 3, "output_dir": str(root / "trained"), "model": {"pretrained": str(tiny_model)},
        "data": {"image_dir": str(image_folder), "resolution": 64}, "lora": {"rank": 4, "alpha": 4},
        "train": {"batch_size": 2, "max_steps": 2}, "optimizer": {"lr": 1e-2}, "validation": {"prompts": []},
        "checkpoint": {"every_n_steps": 0}, "logging": {"tensorboard": False},
    }))
    save_lora_file(load_lora(root / "trained" / "pytorch_lora_weights.safetensors"), root / "webui" / "trained.safetensors", "kohya")

    # A LoRA of another architecture (the toy-world preset: wider text encoder), random non-zero B.
    other = build_tiny_pipeline("world").unet
    add_lora(other, ["to_q", "to_k", "to_v", "to_out.0"], torch.float32, LoRAConfig(rank=4, alpha=4))
    for name, parameter in other.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.5)
    save_lora({"unet": other}, root / "other-base" / "pytorch_lora_weights.safetensors", {"finetune.base_model": "toyworld", "finetune.method": "lora"})

    # A ControlNet of the tiny UNet whose zero convolutions are not zero, so it visibly steers.
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet"))
    for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block, controlnet.controlnet_cond_embedding.conv_out]:
        conv.weight.data.normal_(0, 0.3)
    made = {"finetune.conditioning": '{"kind": "canny", "low": 20.0, "high": 40.0, "sigma": 1.0}'}  # as make-conditions records it
    save_model_folder(controlnet, root / "edges" / "controlnet", {"finetune.method": "controlnet", "finetune.base_model": str(tiny_model), "finetune.steps": "7", **made})
    (root / "edges" / "recipe_as_run.yaml").write_text(yaml.safe_dump({"method": "controlnet", "model": {"pretrained": str(tiny_model)}}))  # its run's record

    make_tiny_model(root / "db" / "pipeline", seed=1)  # a "DreamBooth" pipeline: other weights, same architecture
    (root / "db" / "recipe.yaml").write_text(yaml.safe_dump({"method": "dreambooth", "model": {"pretrained": str(tiny_model)}, "train": {"max_steps": 5}}))

    (root / "evil").mkdir()
    (root / "evil" / "pytorch_lora_weights.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle: never opened
    return root


@pytest.fixture(scope="session")
def demo(adapters_dir, tiny_model):
    """The demo launched for real on a free localhost port, with the tiny model as its base: one app for all of
    tests/test_demo.py and test_demo_browser.py (session-scoped here so that file stays readable at its size)."""
    from finetune.demo.engine import DemoEngine
    from finetune.demo.page import build_app, launch_app

    engine = DemoEngine(str(tiny_model), adapters_dir)
    app = build_app(engine, note="tiny test model", queue_size=4)
    url = launch_app(app, port=free_port(), max_upload_mb=1, block=False)
    yield SimpleNamespace(url=url, engine=engine, app=app)
    app.close()
