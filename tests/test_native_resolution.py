"""`finetune sample` without --resolution and `finetune eval` sample at the model's own resolution: a grid too large to
open is refused at that resolution, read from the model's configs, before torch loads; it was said once torch and the
model had loaded (seconds to a minute)."""

from __future__ import annotations

import json
import shutil

from test_cli_startup import run_in_fresh_python

from finetune.config import SINGLE_FILE_SUFFIXES
from finetune.models.native_resolution import SINGLE_FILE_SUFFIXES as SUFFIXES_WITHOUT_PYDANTIC
from finetune.models.native_resolution import native_resolution

TOO_LARGE = "more than the 600,000,000 pixels finetune opens (PIL refuses larger images as decompression bombs)"


def configs_of_a_256_px_model(folder):
    """A model's configs alone (no weights): a UNet of sample_size 32 and a VAE of 4 blocks (8x downscaling), 256 px."""
    for part, config in (("unet", {"sample_size": 32}), ("vae", {"block_out_channels": [32, 64, 64, 64]})):
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text(json.dumps(config))
    return folder


def test_sample_and_eval_refuse_a_grid_at_the_models_own_resolution_before_torch_loads(tiny_model, tmp_path):
    calls = [
        ["sample", "--base", str(tiny_model), "--prompt", "a", "--num-images", str(10**7), "--out", str(tmp_path / "s")],
        ["eval", "--base", str(tiny_model), "--suite", "adherence", "--images-per-prompt", str(10**6), "--out", str(tmp_path / "e" / "eval.json")],
    ]  # fmt: skip
    modules, errors = run_in_fresh_python(calls)
    assert errors[0] == f"error: --num-images (10000000) with 1 prompt row at 64 px makes a 640000160x64 grid, {TOO_LARGE}: lower --num-images or --resolution\n"
    assert errors[1] == f"error: --images-per-prompt (1000000) with 8 prompt rows at 64 px makes a 64000160x512 report grid, {TOO_LARGE}: lower --images-per-prompt\n"
    assert modules <= {"numpy", "PIL"}  # eval's prompt suites; no torch, no model
    assert not (tmp_path / "s").exists() and not (tmp_path / "e").exists()


def test_the_resolution_is_the_configs_not_a_default(tmp_path):
    """A model of another size (configs alone: it never loads) is refused at its own, 256 px, with --base-config too."""
    configs = configs_of_a_256_px_model(tmp_path / "model")
    (tmp_path / "model.safetensors").write_bytes(b"")
    calls = [
        ["sample", "--base", str(configs), "--prompt", "a", "--prompt", "b", "--num-images", str(10**7), "--out", str(tmp_path / "s")],
        ["sample", "--base", str(tmp_path / "model.safetensors"), "--base-config", str(configs), "--prompt", "a", "--num-images", str(10**7)],
        ["eval", "--base", str(configs), "--suite", "control", "--images-per-prompt", str(10**6), "--out", str(tmp_path / "e.json")],
    ]  # fmt: skip
    modules, errors = run_in_fresh_python(calls)
    assert errors[0].startswith("error: --num-images (10000000) with 2 prompt rows at 256 px makes a 2560000160x512 grid")
    assert errors[1].startswith("error: --num-images (10000000) with 1 prompt row at 256 px makes a 2560000160x256 grid")
    assert errors[2].startswith("error: --images-per-prompt (1000000) with 8 prompt rows at 256 px makes a 256000416x2048 report grid")  # a mask column
    assert modules <= {"numpy", "PIL"}


def test_where_the_configs_are_read_from(tmp_path, monkeypatch):
    import huggingface_hub.constants

    configs = configs_of_a_256_px_model(tmp_path / "model")
    assert native_resolution(str(configs)) == 256
    assert native_resolution(str(tmp_path / "model.safetensors"), str(configs)) == 256  # a single file's --base-config
    assert native_resolution(str(tmp_path / "model.safetensors")) is None  # described by its weights: known once it loads
    assert native_resolution(str(tmp_path / "not-there")) is None and native_resolution(str(tmp_path)) is None  # loading says what is wrong
    (configs / "unet" / "config.json").write_text("{not json")
    assert native_resolution(str(configs)) is None
    # A hub id: from the local cache's snapshot of its main branch, never downloaded.
    snapshot = tmp_path / "hub" / "models--org--sd" / "snapshots" / ("a" * 40)
    configs_of_a_256_px_model(snapshot)
    (tmp_path / "hub" / "models--org--sd" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--sd" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert native_resolution("org/sd") == 256
    assert native_resolution("org/other") is None
    shutil.rmtree(snapshot / "vae")
    assert native_resolution("org/sd") is None
    assert SUFFIXES_WITHOUT_PYDANTIC == SINGLE_FILE_SUFFIXES
