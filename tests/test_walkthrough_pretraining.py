"""Reproducing the toy-world base as a user would: `make base-model`, its stages, and what they write."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch
from conftest import REPO


def _run_make_base_model(folder, calls):
    """`make base-model` in `folder` with stand-ins for .venv/bin's finetune and python that only note their arguments."""
    bin_dir = folder / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("finetune", "python"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\n')
        (bin_dir / name).chmod(0o755)
    (folder / "pyproject.toml").touch()
    os.utime(folder / "pyproject.toml", (0, 0))
    (folder / ".venv" / ".installed").touch()  # set up: newer than pyproject.toml
    subprocess.run(["make", "--no-print-directory", "-f", str(REPO / "Makefile"), "base-model"], cwd=folder, check=True,
                   capture_output=True, text=True, timeout=60)
    return calls.read_text().splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_base_model_run_again_skips_finished_stages_and_continues_the_stopped_one(tmp_path):
    """The chain takes hours: run again after a stop in stage 4, it failed at once on the finished VAE stage
    ('output_dir outputs/base/vae holds an earlier run'), and --resume latest there had nothing left to train."""
    for done in ("outputs/world/all/metadata.jsonl", "outputs/world/train/metadata.jsonl", "outputs/world/train_partial/metadata.jsonl",
                 "outputs/base/init/model_index.json", "finetune/assets/toyworld_perceptual.safetensors",
                 "outputs/base/vae/pipeline/model_index.json", "outputs/base/vae/checkpoints/checkpoint-2500/trainer_state.json",
                 "outputs/base/unet/checkpoints/checkpoint-3500/trainer_state.json"):  # stopped at step 3,500 of stage 4
        (tmp_path / done).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / done).touch()
    calls = _run_make_base_model(tmp_path, tmp_path / "calls")
    assert calls == [
        "finetune train recipes/pretrain_unet.yaml --resume latest",  # the VAE's pipeline is there: not trained again
        "finetune train recipes/pretrain_unet_2.yaml --resume latest",  # no checkpoint yet: --resume latest starts it
        "finetune export-base outputs/base/unet2/pipeline outputs/base/unet2-fp16 --overwrite",
        "finetune train recipes/pretrain_unet_3.yaml --resume latest",
        "finetune export-base outputs/base/unet3/pipeline finetune/assets/toyworld-base --overwrite",
    ]


def test_resume_latest_in_a_new_output_dir_trains_from_the_start(make_recipe):
    """What `make base-model` relies on for a stage it has not started yet."""
    from finetune.training.trainer import train

    result = train(make_recipe(method="vae", train__max_steps=2, validation__at_start=False), resume="latest")
    assert result.final_step == 2 and (result.output_dir / "pipeline" / "model_index.json").is_file()


def test_make_world_data_stopped_midway_leaves_nothing_the_next_run_refuses(tmp_path, monkeypatch, capsys):
    """Ctrl-C while `make base-model` wrote 20,000 images left a half-filled outputs/world/train without its
    metadata.jsonl: make ran make-world-data again (as its Ctrl-C line advises: 'run the command again to continue'),
    which refused the folder ('is not empty')."""
    import itertools

    from finetune.cli.main import main
    import finetune.toyworld.datasets as datasets

    def stopped(n, *args, **kwargs):
        yield from itertools.islice(real_generate(n, *args, **kwargs), 2)
        raise KeyboardInterrupt

    real_generate = datasets.generate
    monkeypatch.setattr(datasets, "generate", stopped)
    assert main(["make-world-data", str(tmp_path / "train"), "--num-images", "4"]) == 130  # "run the command again to start over"
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(datasets, "generate", real_generate)
    assert main(["make-world-data", str(tmp_path / "train"), "--num-images", "4"]) == 0, capsys.readouterr().err
    assert len((tmp_path / "train" / "metadata.jsonl").read_text().splitlines()) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]


def test_export_base_takes_a_pretraining_runs_folder(tiny_model, tmp_path, capsys):
    """`finetune export-base outputs/base/unet3 ...` said 'not a diffusers pipeline folder (no model_index.json)'
    for the folder a stage writes (its pipeline in pipeline/), which export-checkpoint and sample take or name."""
    from diffusers import StableDiffusionPipeline

    from finetune.cli.main import main

    shutil.copytree(tiny_model, tmp_path / "unet3" / "pipeline")
    assert main(["export-base", str(tmp_path / "unet3"), str(tmp_path / "base")]) == 0, capsys.readouterr().err
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "base")
    assert pipeline.unet.dtype == torch.float32 and pipeline.text_encoder.dtype == torch.float32  # fp16 files, one dtype loaded


def test_training_a_classifier_into_a_folder_is_refused_before_it_trains(tmp_path, capsys):
    """`python -m finetune.toyworld.classifier --out finetune/assets` trained for minutes, then failed to save
    with a SafetensorError traceback ('I/O error: Is a directory')."""
    from finetune.toyworld import classifier

    (tmp_path / "a-file").write_text("")
    for out in (tmp_path, tmp_path / "a-file" / "perceptual.safetensors"):
        with pytest.raises(SystemExit):
            classifier.main(["--out", str(out), "--num-images", "8", "--steps", "1", "--eval-images", "8", "--threads", "1"])
        assert capsys.readouterr().err.strip().endswith(f"error: --out {out} is a folder or inside a file: give the path of the .safetensors file to write")


def test_make_world_data_fills_an_empty_folder_in_place(tmp_path, monkeypatch, capsys):
    """`finetune make-world-data .` in a new empty folder was a ValueError traceback ('.' has no name to write a
    temporary folder beside), and an empty folder given by name was removed and replaced: a shell's working folder
    then no longer existed, a mounted disk could not be removed (after every image was made). An empty folder is
    filled in place now, and emptied again where the run stops."""
    from finetune.cli.main import main
    import finetune.toyworld.datasets as datasets

    (tmp_path / "world").mkdir()
    monkeypatch.chdir(tmp_path / "world")
    inode = os.stat(".").st_ino
    assert main(["make-world-data", ".", "--num-images", "2"]) == 0, capsys.readouterr().err
    assert os.stat(tmp_path / "world").st_ino == inode and len((tmp_path / "world" / "metadata.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]

    real_generate = datasets.generate
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(datasets, "generate", lambda n, *args, **kwargs: stopped_after_one(real_generate(n, *args, **kwargs)))
    assert main(["make-world-data", str(tmp_path / "empty"), "--num-images", "3"]) == 130
    assert (tmp_path / "empty").is_dir() and list((tmp_path / "empty").iterdir()) == []


def stopped_after_one(samples):
    yield next(iter(samples))
    raise KeyboardInterrupt
