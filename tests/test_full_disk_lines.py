"""A disk that fills while a run writes what it keeps: one line that says the disk is full, names the folder, and says how
much room the write needs; the last good checkpoint stays, and `--resume latest` takes it."""

import errno
from pathlib import Path

import pytest

from finetune.checkpoints.run_files import list_checkpoints, resolve_resume
from finetune.errors import FinetuneError
from finetune.outputs.full_disk import size_on_disk, size_text
import finetune.training.trainer as trainer


def full_part_way(monkeypatch, at_call: int):
    """safetensors' writer of the checkpoints, filling the disk on its `at_call`-th file: half of it written, then ENOSPC."""
    real, calls = trainer.ckpt.save_file, []

    def writer(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == at_call:
            with open(path, "wb") as file:
                file.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(trainer.ckpt, "save_file", writer)


def test_a_disk_that_fills_under_a_checkpoint_says_so_and_how_much_the_checkpoint_needs(make_recipe, monkeypatch, tmp_path):
    """It said "could not write checkpoint ... (OSError: [Errno 28] ...): make room or fix the permissions": neither that the
    disk was full nor how much room to make."""
    full_part_way(monkeypatch, at_call=2)  # checkpoint-2 whole, checkpoint-4 cut short
    checkpoints = tmp_path / "run" / "checkpoints"
    with pytest.raises(FinetuneError) as raised:
        trainer.train(make_recipe(output_dir=str(tmp_path / "run"), train__max_steps=6, checkpoint__every_n_steps=2, checkpoint__keep_last=1))
    needs = size_text(size_on_disk(checkpoints / "checkpoint-2"))
    assert str(raised.value).startswith(f"no space left on the disk of {checkpoints} (")
    assert str(raised.value).endswith(f" free) for checkpoint-4, which needs about {needs}, as checkpoint-2: make room, then --resume latest "
                                      f"(checkpoint-2, the last complete checkpoint, is kept; the unfinished checkpoint-4 was removed)")
    assert "\n" not in str(raised.value)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2"]  # no partial folder, the previous one kept
    assert resolve_resume("latest", checkpoints) == checkpoints / "checkpoint-2"


def test_a_disk_that_fills_under_the_first_checkpoint_says_what_it_had_written(make_recipe, monkeypatch, tmp_path):
    full_part_way(monkeypatch, at_call=1)
    with pytest.raises(FinetuneError, match=rf"^no space left on the disk of .*checkpoints \(.* free\) for checkpoint-2, which needs at least {size_text(4096)}, "
                                            r"what it had written when the disk filled: make room, then --resume latest \(none was complete yet"):
        trainer.train(make_recipe(output_dir=str(tmp_path / "run"), train__max_steps=4, checkpoint__every_n_steps=2))
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == [] and not any((tmp_path / "run" / "checkpoints").iterdir())


def test_a_disk_that_fills_under_the_final_lora_says_so_and_a_resume_writes_it_without_training(make_recipe, monkeypatch, tmp_path, capsys):
    """It said "could not write the outputs in RUN (OSError: [Errno 28] ...): make room or fix its permissions": not that the
    disk was full, how much the LoRA needs, nor that --resume latest writes it."""
    import finetune.outputs.atomic_files as atomic_files
    from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME

    real = atomic_files.save_file

    def full_outside_the_checkpoints(tensors, path, *args, **kwargs):
        if ".partial-checkpoint-" not in path:
            with open(path, "wb") as file:
                file.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, *args, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(atomic_files, "save_file", full_outside_the_checkpoints)
    with pytest.raises(FinetuneError) as raised:
        trainer.train(make_recipe(output_dir=str(run), train__max_steps=2))
    needs = size_text(size_on_disk(run / "checkpoints" / "checkpoint-2" / LORA_WEIGHTS_NAME))
    assert str(raised.value).startswith(f"no space left on the disk of {run} (")
    assert str(raised.value).endswith(f" free) for the run's outputs, which need about {needs} (their copy in checkpoint-2): make room, "
                                      f"then --resume latest finishes the run from checkpoint-2, the newest complete checkpoint")
    assert not (run / LORA_WEIGHTS_NAME).exists() and not list(run.glob(".*.partial"))
    monkeypatch.setattr(atomic_files, "save_file", real)
    result = trainer.train(make_recipe(output_dir=str(run), train__max_steps=2), resume="latest")
    assert (run / LORA_WEIGHTS_NAME).is_file() and result.losses == []  # written, nothing trained again


def grid_full_at(monkeypatch, step: int):
    """PIL's writer meets a full disk under the validation grid of `step` (half of it written); the others are written."""
    from PIL import Image

    real = Image.Image.save

    def writer(image, file, *args, **kwargs):
        if Path(file).name == f".step-{step:06d}.png.partial":
            Path(file).write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real(image, file, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", writer)


SAMPLED = dict(train__max_steps=3, checkpoint__every_n_steps=1, validation__prompts=["a shape"], validation__every_n_steps=1,
               validation__num_inference_steps=1, validation__at_start=False)  # fmt: skip


def test_a_grid_the_disk_is_full_for_mid_run_is_a_warning_and_the_run_goes_on(make_recipe, monkeypatch, tmp_path, capsys):
    """A grid is a view of the run, not its state: a full disk under one ended the run (hours of training, for a picture),
    where the checkpoint due next says a disk that stays full, keeping the last good one."""
    from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME

    grid_full_at(monkeypatch, 2)
    result = trainer.train(make_recipe(output_dir=str(tmp_path / "run"), **SAMPLED))
    samples = tmp_path / "run" / "samples"
    assert f"warning: could not write the sample grid {samples / 'step-000002.png'} (no space left on the disk (" in capsys.readouterr().out
    assert result.final_step == 3 and (tmp_path / "run" / LORA_WEIGHTS_NAME).is_file()
    assert sorted(p.name for p in samples.iterdir()) == ["step-000001.png", "step-000003.png"]  # no hidden half of the one not written


def test_a_final_grid_the_disk_is_full_for_is_the_runs_error_and_its_resume_draws_it(make_recipe, monkeypatch, tmp_path):
    """The last grid keeps its checkpoint's word that the final samples are to come, so that --resume latest draws them."""
    grid_full_at(monkeypatch, 3)
    run = tmp_path / "run"
    with pytest.raises(FinetuneError, match=r"^could not write the sample grid .*step-000003.png \(no space left on the disk \(.* free\)\): the outputs and "
                                            r"the last checkpoint are written; make room, then --resume latest draws the final samples, without training"):
        trainer.train(make_recipe(output_dir=str(run), **SAMPLED))
    monkeypatch.undo()
    result = trainer.train(make_recipe(output_dir=str(run), **SAMPLED), resume="latest")
    assert result.losses == [] and result.sample_grids == [run / "samples" / "step-000003.png"] and result.sample_grids[0].is_file()


def test_a_disk_that_fills_under_the_last_checkpoint_says_the_outputs_are_written(make_recipe, monkeypatch, tmp_path):
    """The outputs are written before the last checkpoint: its line said only to make room and resume, as if the run's
    LoRA were lost, when it was in output_dir, whole."""
    from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME

    full_part_way(monkeypatch, at_call=2)  # checkpoint-2 whole; checkpoint-4, the last, cut short
    run = tmp_path / "run"
    with pytest.raises(FinetuneError) as raised:
        trainer.train(make_recipe(output_dir=str(run), train__max_steps=4, checkpoint__every_n_steps=2))
    assert str(raised.value).startswith(f"no space left on the disk of {run / 'checkpoints'} (")
    assert str(raised.value).endswith(f"is kept; the unfinished checkpoint-4 was removed). The run's outputs are written, whole: {run / LORA_WEIGHTS_NAME}")
    assert (run / LORA_WEIGHTS_NAME).is_file()


def test_torch_saves_stream_error_on_a_full_disk_is_the_full_disk_line(make_recipe, monkeypatch, tmp_path):
    """A real run on a full tmpfs: torch.save (accelerate's custom state) failed with "basic_ios::clear: iostream error",
    no errno, which no check knew for a failed write: a traceback. Here the disk is full by its room, as it read there."""
    from accelerate import Accelerator

    import finetune.outputs.full_disk as full_disk

    real, calls = Accelerator.save_state, []

    def full_at_the_second(self, output_dir, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            monkeypatch.setattr(full_disk, "free_bytes", lambda folder: 49_000)
            raise RuntimeError("basic_ios::clear: iostream error")
        return real(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_at_the_second)
    with pytest.raises(FinetuneError, match=r"^no space left on the disk of .*checkpoints \(49 KB free\) for checkpoint-4, which needs about .*, as checkpoint-2"):
        trainer.train(make_recipe(output_dir=str(tmp_path / "run"), train__max_steps=6, checkpoint__every_n_steps=2))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["checkpoint-2"]
