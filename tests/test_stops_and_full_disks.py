"""Checkpoints and resuming, as a user meets them: a stop at the last step, a full disk."""

import os
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
from finetune.checkpoints.run_files import list_checkpoints
from finetune.errors import FinetuneError
from finetune.outputs.atomic_files import atomic_save_safetensors
import finetune.training.trainer as trainer
import finetune.training.training_run as training_run


def test_a_stop_during_the_last_step_finishes_the_run_with_its_outputs(make_recipe, tmp_path):
    """Ctrl-C while the last step trained stopped as mid-run: a checkpoint of the last step and no outputs,
    and `--resume latest` then had nothing left to train. It finishes now, skipping only the last samples."""
    recipe = make_recipe(output_dir=str(tmp_path / "run"), train__max_steps=3, validation__prompts=["a shape"],
                         validation__num_inference_steps=1, validation__at_start=False)  # fmt: skip
    result = trainer.train(recipe, on_step=lambda step: os.kill(os.getpid(), signal.SIGINT) if step == 3 else None)
    assert not result.interrupted and result.final_step == 3 and not result.sample_grids
    assert (result.output_dir / LORA_WEIGHTS_NAME).is_file()
    assert [p.name for p in list_checkpoints(result.output_dir / "checkpoints")] == ["checkpoint-3"]


def test_a_disk_that_fills_while_a_checkpoints_weights_are_written_is_one_line_and_leaves_the_last_good_one(make_recipe, monkeypatch, tmp_path):
    """safetensors reports a full disk as its own SafetensorError, which went up as a traceback and left the
    half-written folder behind."""
    from safetensors import SafetensorError

    real, calls = trainer.ckpt.save_file, []

    def full_at_the_second(tensors, path, *args, **kwargs):  # the trainable weights, first file of a checkpoint
        calls.append(path)
        if len(calls) == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(trainer.ckpt, "save_file", full_at_the_second)
    with pytest.raises(FinetuneError, match=r"^no space left on the disk of .*checkpoints \(.* free\) for checkpoint-4, which needs about .*, as checkpoint-2: make room"):
        trainer.train(make_recipe(output_dir=str(tmp_path / "run"), train__max_steps=6, checkpoint__every_n_steps=2))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["checkpoint-2"]


def test_a_disk_that_fills_while_the_outputs_are_written_is_one_line(make_recipe, monkeypatch, tmp_path):
    """The last checkpoint was written, the outputs beside it were not: a traceback of safetensors' own error."""
    from safetensors import SafetensorError

    import finetune.outputs.atomic_files as atomic_files

    real = atomic_files.save_file

    def full_outside_the_checkpoint(tensors, path, *args, **kwargs):
        if ".partial-checkpoint-" not in path:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(atomic_files, "save_file", full_outside_the_checkpoint)
    with pytest.raises(FinetuneError, match=r"^no space left on the disk of .*run \(.* free\) for the run's outputs, which need about .* \(their copy in "
                                            r"checkpoint-2\): make room, then --resume latest finishes the run from checkpoint-2, the newest complete checkpoint$"):
        trainer.train(make_recipe(output_dir=str(tmp_path / "run"), train__max_steps=2))
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["checkpoint-2"]
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-2" / LORA_WEIGHTS_NAME).is_file()


def test_a_resume_says_when_the_training_images_changed_since_its_checkpoint(make_recipe, image_folder, tmp_path, capsys):
    """Images added, removed or edited in the data folder change what the resumed run trains on and its data
    order: no setting changed, so nothing was said."""
    import shutil

    folder = shutil.copytree(image_folder, tmp_path / "images", ignore=shutil.ignore_patterns("metadata.jsonl"))
    trainer.train(make_recipe(data__image_dir=str(folder), train__max_steps=2))
    resumed = dict(data__image_dir=str(folder))
    capsys.readouterr()
    trainer.train(make_recipe(train__max_steps=3, **resumed), resume="latest")  # the same images: nothing said
    assert "warning: settings changed" not in capsys.readouterr().out
    shutil.copy(folder / "0000.png", folder / "0009.png")
    shutil.copy(folder / "0000.txt", folder / "0009.txt")
    trainer.train(make_recipe(train__max_steps=4, **resumed), resume="latest")
    assert "warning: settings changed since checkpoint-3: training images 4 -> 5" in capsys.readouterr().out
    (folder / "0009.txt").write_text("another caption")
    trainer.train(make_recipe(train__max_steps=5, **resumed), resume="latest")
    assert "warning: settings changed since checkpoint-4: training images 5 -> 5 (other images or captions)" in capsys.readouterr().out


def test_a_disk_that_fills_under_a_sample_grid_or_the_logs_is_one_line(make_recipe, monkeypatch, tmp_path, capsys):
    """Checkpoints and outputs say a full disk in one line; the grids and TensorBoard's files, written between
    them, ended the command with a traceback."""
    import errno

    import yaml

    from finetune.cli import main as cli

    recipe = make_recipe(output_dir=str(tmp_path / "run"), train__max_steps=3, checkpoint__every_n_steps=1)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    grid = tmp_path / "run" / "samples" / "step-000002.png"

    def full_at_step_2(recipe, method, modules, accelerator, step):
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(grid))
        return None

    monkeypatch.setattr(training_run, "run_validation", full_at_step_2)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert cli.main(["train", str(tmp_path / "recipe.yaml"), "validation.every_n_steps=1"]) == 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert "Traceback" not in err and (
        f"error: no space left on the disk of {tmp_path / 'run'} (writing {grid}): make room, then --resume latest (the last complete checkpoint is kept)\n") in err
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["checkpoint-1", "checkpoint-2"]


def test_a_damaged_weight_average_in_a_checkpoint_is_one_line_naming_it(make_recipe, tmp_path):
    """The checkpoint's other files said so; ema.safetensors cut short was a SafetensorError traceback."""
    common = dict(output_dir=str(tmp_path / "run"), train__ema_decay=0.9)
    trainer.train(make_recipe(train__max_steps=2, **common))
    average = tmp_path / "run" / "checkpoints" / "checkpoint-2" / "ema.safetensors"
    average.write_bytes(average.read_bytes()[:60])
    with pytest.raises(FinetuneError, match=r"^checkpoint .*checkpoint-2 is damaged or incomplete \(ema.safetensors: SafetensorError: .*\): "
                                            r"move it out of .*checkpoints and resume from the one before it$"):
        trainer.train(make_recipe(train__max_steps=3, **common), resume="latest")


def test_a_weight_average_of_other_shapes_or_a_count_that_is_no_number_is_one_line(make_recipe, tmp_path):
    """Same names, another shape (a (1,) tensor that copy_ would have broadcast into every average), or an "updates"
    count that is no number: each was a traceback or a silently wrong average."""
    common = dict(output_dir=str(tmp_path / "run"), train__ema_decay=0.9)
    trainer.train(make_recipe(train__max_steps=2, **common))
    average = tmp_path / "run" / "checkpoints" / "checkpoint-2" / "ema.safetensors"
    kept = load_file(str(average))
    save_file({name: torch.zeros(1) for name in kept}, str(average), metadata={"updates": "2"})
    with pytest.raises(FinetuneError, match=r"^.*ema.safetensors averages \S+ at shape \(1,\), not this recipe's: resume with the recipe that wrote it$"):
        trainer.train(make_recipe(train__max_steps=3, **common), resume="latest")
    save_file(kept, str(average), metadata={"updates": "two"})
    with pytest.raises(FinetuneError, match=r"^checkpoint .*checkpoint-2 is damaged or incomplete \(ema.safetensors: ValueError: .*\): "):
        trainer.train(make_recipe(train__max_steps=3, **common), resume="latest")


def test_an_unwritable_place_for_a_file_leaves_no_partial_copy_beside_it(tmp_path):
    """A folder where the file goes: the rename fails after the whole file was written under its hidden name."""
    (tmp_path / "out.safetensors").mkdir()
    with pytest.raises(OSError):
        atomic_save_safetensors({"w": torch.zeros(2)}, tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_a_checkpoint_without_its_random_states_is_one_line_not_another_curve(make_recipe, tmp_path):
    """accelerate skips random states it cannot read (a log line at info level): the resumed run drew other
    LoRA dropout masks than the uninterrupted one, without a word."""
    common = dict(output_dir=str(tmp_path / "run"), lora__dropout=0.1)
    trainer.train(make_recipe(train__max_steps=2, **common))
    states = tmp_path / "run" / "checkpoints" / "checkpoint-2" / "random_states_0.pkl"
    for damage in (lambda: states.write_bytes(states.read_bytes()[:100]), states.unlink):
        damage()
        with pytest.raises(FinetuneError, match=r"^checkpoint .*checkpoint-2 is damaged or incomplete \(random_states_0.pkl: missing or cut short\): "
                                                r"move it out of .*checkpoints and resume from the one before it$"):
            trainer.train(make_recipe(train__max_steps=3, **common), resume="latest")


def test_a_pipeline_or_controlnet_folder_that_fails_half_written_leaves_no_hidden_copy(make_recipe, monkeypatch, tmp_path):
    """A full disk under the final pipeline (or ControlNet) folder left its half in `.pipeline.partial`, hidden, holding
    the space the user was told to make, until a later save."""
    import errno

    import torch
    from diffusers import StableDiffusionPipeline

    from finetune.outputs.pipeline_io import save_model_folder

    real = StableDiffusionPipeline.save_pretrained

    def full_outside_the_checkpoint(self, folder, *args, **kwargs):
        real(self, folder, *args, **kwargs)
        if ".partial-checkpoint-" not in str(folder):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", full_outside_the_checkpoint)
    with pytest.raises(FinetuneError, match=r"^no space left on the disk of .*run \(.* free\) for the run's outputs"):
        trainer.train(make_recipe(output_dir=str(tmp_path / "run"), method="full", train__max_steps=1, optimizer__lr=1e-5))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["base_paths.json", "checkpoints", "recipe_as_run.yaml"]

    class HalfWritten(torch.nn.Linear):
        def save_pretrained(self, folder, **kwargs):
            (folder / "diffusion_pytorch_model.safetensors").parent.mkdir(parents=True)
            (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        save_model_folder(HalfWritten(2, 2), tmp_path / "out" / "controlnet", {})
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_second_stop_while_a_checkpoint_is_written_leaves_no_half_of_it(make_recipe, monkeypatch, tmp_path):
    """The second Ctrl-C aborts at once; the half-written `.partial-checkpoint-N` (gigabytes for a full fine-tune)
    stayed until a later save."""
    from accelerate import Accelerator

    real, calls = Accelerator.save_state, []

    def interrupted_at_the_second(self, output_dir, **kwargs):
        calls.append(output_dir)
        real(self, output_dir, **kwargs)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the second signal, once the first files are written

    monkeypatch.setattr(Accelerator, "save_state", interrupted_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(make_recipe(output_dir=str(tmp_path / "run"), train__max_steps=6, checkpoint__every_n_steps=2))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["checkpoint-2"]


def test_the_outputs_are_on_disk_before_the_last_checkpoint(make_recipe, monkeypatch, tmp_path):
    """The last checkpoint came first: a kill (OOM, a scheduler's SIGKILL after its grace period) while the outputs
    were written left a checkpoint at the last step and no outputs, and --resume latest then had nothing left to
    train. Now a kill before the last checkpoint resumes from the one before it."""
    real, outputs_then = trainer.ckpt.save_checkpoint, []

    def checkpoint(accelerator, checkpoints_dir, step, *args, **kwargs):
        outputs_then.append((tmp_path / "run" / LORA_WEIGHTS_NAME).is_file())
        return real(accelerator, checkpoints_dir, step, *args, **kwargs)

    monkeypatch.setattr(trainer.ckpt, "save_checkpoint", checkpoint)
    trainer.train(make_recipe(output_dir=str(tmp_path / "run"), train__max_steps=3, checkpoint__every_n_steps=2))
    assert outputs_then == [False, True]  # checkpoint-2 during the run, checkpoint-3 after the outputs


def test_ctrl_c_while_an_image_a_report_or_a_tiny_model_is_written_leaves_no_hidden_partial(monkeypatch, tmp_path):
    """Ctrl-C between the write and the rename (or midway through a model's files) left `.NAME.partial` beside the output."""
    from pathlib import Path

    from PIL import Image

    from finetune.cli.main import main
    from finetune.evaluation.evaluate import write_report
    import finetune.models.tiny_model
    from finetune.sampling.grids import save_image_atomic

    def interrupted(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(Path, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            save_image_atomic(Image.new("RGB", (8, 8)), tmp_path / "image.png")
        patched.setattr(os, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            write_report({"settings": {}, "metrics": {}, "n": {}, "prompts": {}}, tmp_path / "eval.json")

    def half_a_model(folder, **options):
        (Path(folder) / "unet").mkdir(parents=True)
        (Path(folder) / "unet" / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune.models.tiny_model, "make_tiny_model", half_a_model)
    assert main(["make-tiny-model", str(tmp_path / "tiny")]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == []
