"""The end of a run (finetune.training.run_end): what a kill, a Ctrl-C or two leave after the last step is finished, or said, never
lost. Each kill is put at its point by a monkeypatch that raises where the process would have died."""

import json
import os
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME, STATE_FILE
from finetune.errors import FinetuneError
from finetune.training.run_end import OUTPUTS_PENDING, VALIDATION_PENDING
import finetune.training.trainer as trainer
import finetune.training.training_run as training_run

SAMPLED = dict(train__max_steps=3, checkpoint__every_n_steps=2, validation__prompts=["a shape"], validation__num_inference_steps=1,
               validation__images_per_prompt=1, validation__at_start=False, validation__loss_images=1)  # fmt: skip


class Killed(BaseException):
    """SIGKILL: nothing after it runs (the process is gone)."""


def last_state(run: Path) -> dict:
    return json.loads((run / "checkpoints" / "checkpoint-3" / STATE_FILE).read_text())


def test_a_kill_while_the_final_samples_are_drawn_is_finished_by_resume_latest(make_recipe, monkeypatch, tmp_path, capsys):
    """Killed while the last grid was drawn, after the last checkpoint was written: `--resume latest` refused (nothing left
    to train) and the grid was never drawn. It draws it now, the grid (and held-out loss) the run would have ended with."""
    straight = trainer.train(make_recipe(output_dir=str(tmp_path / "straight"), **SAMPLED))
    real = training_run.run_validation

    def killed_at_the_last(recipe, method, modules, accelerator, step):
        if step == 3:
            raise Killed
        return real(recipe, method, modules, accelerator, step)

    monkeypatch.setattr(training_run, "run_validation", killed_at_the_last)
    with pytest.raises(Killed):
        trainer.train(make_recipe(output_dir=str(tmp_path / "killed"), **SAMPLED))
    monkeypatch.undo()
    assert not (tmp_path / "killed" / "samples" / "step-000003.png").exists() and last_state(tmp_path / "killed")[VALIDATION_PENDING]
    capsys.readouterr()

    resumed = trainer.train(make_recipe(output_dir=str(tmp_path / "killed"), **SAMPLED), resume="latest")
    said = capsys.readouterr().out
    assert "is the last of a run that had trained to its end (step 3): writing its final samples" in said
    assert resumed.final_step == 3 and resumed.validation_losses == straight.validation_losses[-1:]
    assert [grid.name for grid in resumed.sample_grids] == ["step-000003.png"]
    assert resumed.sample_grids[0].read_bytes() == straight.sample_grids[-1].read_bytes()
    assert not last_state(tmp_path / "killed")[VALIDATION_PENDING]
    with pytest.raises(FinetuneError, match="nothing left to train"):  # drawn: the next resume has nothing to do
        trainer.train(make_recipe(output_dir=str(tmp_path / "killed"), **SAMPLED), resume="latest")


def stopped_while_the_outputs_are_written(make_recipe, monkeypatch, output_dir):
    """A 3-step run stopped by a second Ctrl-C as its last step's outputs are written (their metadata is made first;
    the checkpoint's copy of them after)."""
    real, calls = training_run.output_metadata, []

    def second_ctrl_c(recipe, step, *args, **kwargs):
        calls.append(step)
        if calls.count(3) == 1 and step == 3:
            raise KeyboardInterrupt
        return real(recipe, step, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(training_run, "output_metadata", second_ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            trainer.train(make_recipe(output_dir=str(output_dir), **SAMPLED))


def test_a_second_stop_while_the_outputs_are_written_is_finished_by_resume_latest(make_recipe, monkeypatch, tmp_path, capsys):
    """A second Ctrl-C while the outputs were written: the last checkpoint was saved (the trained state kept), the outputs
    were not, and `--resume latest` refused with nothing left to train: the run's LoRA was lost unless trained again."""
    straight = trainer.train(make_recipe(output_dir=str(tmp_path / "straight"), **SAMPLED))
    stopped_while_the_outputs_are_written(make_recipe, monkeypatch, tmp_path / "stopped")
    state = last_state(tmp_path / "stopped")
    assert state[OUTPUTS_PENDING] and state[VALIDATION_PENDING] and not (tmp_path / "stopped" / LORA_WEIGHTS_NAME).exists()
    capsys.readouterr()

    resumed = trainer.train(make_recipe(output_dir=str(tmp_path / "stopped"), **SAMPLED), resume="latest")
    assert "writing its outputs and its final samples" in capsys.readouterr().out
    assert resumed.saved_files == [tmp_path / "stopped" / LORA_WEIGHTS_NAME]
    weights, expected = load_file(resumed.saved_files[0]), load_file(straight.output_dir / LORA_WEIGHTS_NAME)
    assert weights.keys() == expected.keys() and all(weights[name].equal(expected[name]) for name in weights)
    assert resumed.sample_grids[0].read_bytes() == straight.sample_grids[-1].read_bytes()
    assert not (last_state(tmp_path / "stopped")[OUTPUTS_PENDING] or last_state(tmp_path / "stopped")[VALIDATION_PENDING])


def test_a_finished_runs_last_checkpoint_says_nothing_is_pending_and_a_longer_run_trains_on(make_recipe, tmp_path):
    """A run that ended whole leaves nothing for a resume to redo; one with a higher train.max_steps continues it."""
    trainer.train(make_recipe(**SAMPLED))
    state = last_state(tmp_path / "run")
    assert not state[OUTPUTS_PENDING] and not state[VALIDATION_PENDING]
    longer = trainer.train(make_recipe(**{**SAMPLED, "train__max_steps": 4}), resume="latest")
    assert longer.final_step == 4 and [grid.name for grid in longer.sample_grids] == ["step-000004.png"]


def test_a_stop_after_the_last_step_says_the_final_samples_it_skipped_and_resume_latest_draws_them(make_recipe, tmp_path, capsys):
    """Ctrl-C during the last step (or the final save) skipped the final samples without a word, and the run exited 0."""
    recipe = make_recipe(**SAMPLED)
    stopped = trainer.train(recipe, on_step=lambda step: os.kill(os.getpid(), signal.SIGINT) if step == 3 else None)
    grid = tmp_path / "run" / "samples" / "step-000003.png"
    assert not stopped.interrupted and stopped.stopped_by == signal.SIGINT and not stopped.sample_grids and not grid.exists()
    assert (f"stopped (Ctrl-C) after the last step, the outputs written: the final samples ({grid}) are skipped; draw them with "
            f"--resume latest (finetune train {tmp_path / 'run' / 'recipe_as_run.yaml'} --resume latest)") in capsys.readouterr().out
    resumed = trainer.train(recipe, resume="latest")
    assert resumed.sample_grids == [grid] and grid.is_file() and not resumed.stopped_by and not last_state(tmp_path / "run")[VALIDATION_PENDING]


def test_finetune_train_exits_as_the_stop_that_skipped_the_final_samples(monkeypatch, tmp_path, capsys):
    from types import SimpleNamespace

    from finetune.cli import main as cli
    import finetune.cli.run_refusals
    import finetune.config.recipe_loading
    import finetune.data_check.starting_files
    import finetune.data_check.train_inputs
    import finetune.models.native_resolution

    monkeypatch.setattr(finetune.config.recipe_loading, "load_recipe", lambda *a: SimpleNamespace(output_dir=str(tmp_path), data=SimpleNamespace(resolution=512), model=SimpleNamespace(pretrained="", single_file_config=None)))
    monkeypatch.setattr(finetune.data_check.train_inputs, "check_inputs_exist", lambda recipe: None)
    monkeypatch.setattr(finetune.data_check.train_inputs, "check_data_first", lambda recipe, resume_from=None: None)  # nor data (this recipe names none)
    monkeypatch.setattr(finetune.data_check.starting_files, "check_starting_files", lambda recipe, resuming: None)  # nor the files it starts from
    monkeypatch.setattr(finetune.cli.run_refusals, "check_run_first", lambda *a: None)  # nor train()'s refusals of the run
    monkeypatch.setattr(finetune.models.native_resolution, "far_from_native_line", lambda *a: None)
    output = tmp_path / LORA_WEIGHTS_NAME
    monkeypatch.setattr(trainer, "train", lambda *a, **k: SimpleNamespace(interrupted=False, stopped_by=2, sample_grids=[], saved_files=[output]))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert cli.main(["train", "recipe.yaml"]) == 130
    finally:
        signal.signal(signal.SIGTERM, previous)  # cli.main makes SIGTERM raise for the rest of its process
    assert f"output: {output}" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["outputs", "samples", "checkpoint-state", "checkpoint-rename"])
def test_a_second_stop_during_the_end_says_what_is_left(make_recipe, monkeypatch, tmp_path, where):
    """A second Ctrl-C during the final save said "run the command again to continue", though nothing was left to train:
    the line now says what --resume latest does from what is on disk."""
    from finetune.stop_signals import stop_line

    real_metadata, real_validation, real_replace, real_write = training_run.output_metadata, training_run.run_validation, trainer.ckpt.replace_folder, trainer.ckpt.atomic_write_text

    def second_stop(*args, **kwargs):
        raise KeyboardInterrupt

    last_steps = []

    def stopped_at_the_outputs(recipe, step, *args, **kwargs):  # the last step's first call (its checkpoint's copy of the outputs is the second)
        last_steps.extend([step] if step == 3 else [])
        return second_stop() if last_steps == [3] and step == 3 else real_metadata(recipe, step, *args, **kwargs)

    if where == "outputs":
        monkeypatch.setattr(training_run, "output_metadata", stopped_at_the_outputs)
    elif where == "samples":
        monkeypatch.setattr(training_run, "run_validation", lambda recipe, method, modules, accelerator, step: second_stop() if step == 3 else
                            real_validation(recipe, method, modules, accelerator, step))  # fmt: skip
    elif where == "checkpoint-state":  # before the last checkpoint is complete: checkpoint-2 is the latest
        monkeypatch.setattr(trainer.ckpt, "atomic_write_text", lambda path, text: second_stop() if "checkpoint-3" in path.parent.name else real_write(path, text))
    else:  # complete, before its rename into place: a resume takes it where it lies
        monkeypatch.setattr(trainer.ckpt, "replace_folder", lambda new, final: second_stop() if final.name == "checkpoint-3" else real_replace(new, final))
    with pytest.raises(KeyboardInterrupt) as stopped:
        trainer.train(make_recipe(**SAMPLED))
    line, again = stop_line(stopped.value, "run the command again to continue"), f"finetune train {tmp_path / 'run' / 'recipe_as_run.yaml'} --resume latest"
    expected = {
        "outputs": f"the run trained to its end; --resume latest writes its outputs and its final samples, without training ({again})",
        "samples": f"the run trained to its end; --resume latest writes its final samples, without training ({again})",
        "checkpoint-state": f"continue with --resume latest ({again}): it trains again from {tmp_path / 'run' / 'checkpoints' / 'checkpoint-2'}",
        "checkpoint-rename": f"the run trained to its end; --resume latest writes its final samples, without training ({again})",
    }[where]
    assert line == f"\nstopped (Ctrl-C): files written so far are kept; {expected}"


def test_the_hidden_half_grid_a_kill_left_is_removed_by_the_next_run_and_a_users_file_stays(make_recipe, tmp_path):
    """SIGKILL while the final grid was saved left `.step-N.png.partial` in samples/ for good: no later run draws that step."""
    samples = tmp_path / "run" / "samples"
    samples.mkdir(parents=True)
    for name in (".step-000003.png.partial", ".loss-masks.png.partial", ".my-notes.png.partial", "step-000003.png"):
        (samples / name).write_bytes(b"half a PNG")
    trainer.train(make_recipe(train__max_steps=1))
    assert sorted(p.name for p in samples.iterdir()) == [".my-notes.png.partial", "step-000003.png"]


def test_a_second_stop_whose_last_checkpoint_cannot_be_read_is_still_the_stop(tmp_path):
    """The line of what is left reads the last checkpoint's state: one a kill left unreadable must not turn the stop into its error."""
    from finetune.training.run_end import next_step_said

    (tmp_path / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-3" / STATE_FILE).write_text('{"step": 3, "max_st')
    with pytest.raises(KeyboardInterrupt) as stopped, next_step_said(tmp_path, tmp_path / "checkpoints", 3):
        raise KeyboardInterrupt
    assert stopped.value.next_step == "continue with --resume latest"


def test_the_vaes_final_grid_is_wanted_without_prompts_and_another_methods_is_not():
    """The VAE's grid reconstructs training images: its last checkpoint says it is to come though validation.prompts is empty."""
    from types import SimpleNamespace

    from finetune.methods.lora import LoRAMethod
    from finetune.methods.vae import VAEMethod
    from finetune.training.run_end import final_samples_wanted

    no_prompts, prompts = SimpleNamespace(validation=SimpleNamespace(all_prompts=[])), SimpleNamespace(validation=SimpleNamespace(all_prompts=["a shape"]))
    assert final_samples_wanted(no_prompts, VAEMethod, []) and not final_samples_wanted(no_prompts, LoRAMethod, [])
    assert final_samples_wanted(prompts, LoRAMethod, []) and final_samples_wanted(no_prompts, LoRAMethod, ["held out"])


def test_a_run_counted_in_epochs_is_finished_by_resume_latest_too(make_recipe, monkeypatch, tmp_path):
    """train.max_epochs: its steps are known once the data is read, where its own 'nothing left to train' is said."""
    epochs = {**SAMPLED, "train__max_steps": None, "train__max_epochs": 3}  # 3 steps of this data (1 held out)

    def killed_at_the_last(recipe, method, modules, accelerator, step):
        raise Killed

    monkeypatch.setattr(training_run, "run_validation", killed_at_the_last)
    with pytest.raises(Killed):
        trainer.train(make_recipe(**epochs))
    monkeypatch.undo()
    resumed = trainer.train(make_recipe(**epochs), resume="latest")
    assert resumed.final_step == 3 and [grid.name for grid in resumed.sample_grids] == ["step-000003.png"]
    assert not last_state(tmp_path / "run")[VALIDATION_PENDING]


def test_a_second_stop_mid_run_names_the_command_that_continues_from_its_checkpoint(make_recipe, tmp_path):
    """A second Ctrl-C mid-run (during a step, or while the first one's checkpoint is saved) said "run the command again to
    continue": run again without --resume, the command is refused (the output_dir holds an earlier run). It names
    --resume latest and the checkpoint it continues from."""
    from finetune.cli.main import RERUN_AFTER_A_STOP
    from finetune.stop_signals import stop_line

    def two_ctrl_cs(step):
        if step == 3:
            signal.raise_signal(signal.SIGINT)  # the first: held to the step's end
            signal.raise_signal(signal.SIGINT)  # the second: raised at once

    with pytest.raises(KeyboardInterrupt) as stopped:
        trainer.train(make_recipe(train__max_steps=6, checkpoint__every_n_steps=2), on_step=two_ctrl_cs)
    run = tmp_path / "run"
    again = f"finetune train {run / 'recipe_as_run.yaml'} --resume latest"
    assert stop_line(stopped.value, RERUN_AFTER_A_STOP["train"]) == (
        f"\nstopped (Ctrl-C): files written so far are kept; continue with --resume latest ({again}): it trains again from {run / 'checkpoints' / 'checkpoint-2'}"
    )
    assert (run / "recipe_as_run.yaml").is_file()  # the command it names is there to run


def test_a_first_stop_while_the_final_samples_are_drawn_is_said_at_once(make_recipe, monkeypatch, tmp_path, capfd):
    """A first Ctrl-C during the final samples (minutes, after the last checkpoint) was held without a word: it is said as
    it comes, with what is being finished, what a second one does and what --resume latest then does."""
    real_validation, said_as_it_came = training_run.run_validation, []

    def ctrl_c_while_drawing(recipe, method, modules, accelerator, step):
        if step == 3:
            capfd.readouterr()  # (what the run said before)
            signal.raise_signal(signal.SIGINT)
            said_as_it_came.append(capfd.readouterr().err)  # before the grid is drawn
        return real_validation(recipe, method, modules, accelerator, step)

    monkeypatch.setattr(training_run, "run_validation", ctrl_c_while_drawing)
    result = trainer.train(make_recipe(**SAMPLED))
    run = tmp_path / "run"
    assert said_as_it_came == [
        f"\nCtrl-C: finishing the final samples ({run / 'samples' / 'step-000003.png'}); the outputs and the last checkpoint are written. "
        f"A second Ctrl-C stops now, and --resume latest then draws them, without training (finetune train {run / 'recipe_as_run.yaml'} --resume latest)\n"
    ]
    assert (run / "samples" / "step-000003.png").is_file() and not result.interrupted  # the first stop finished them
    assert not last_state(run)[VALIDATION_PENDING]


def test_a_second_stop_before_any_checkpoint_of_a_run_resumed_from_another_folder_says_the_same_command_continues(make_recipe, monkeypatch, tmp_path):
    """Resumed from a checkpoint copied from another folder, a second Ctrl-C before this run kept a checkpoint of its own
    said "no checkpoint and no outputs were kept: run the command again to start over", where the same command (its
    --resume) continues from that checkpoint's step."""
    from accelerate import Accelerator

    trainer.train(make_recipe(output_dir=str(tmp_path / "first"), train__max_steps=2, checkpoint__every_n_steps=2))
    copied = tmp_path / "copied" / "checkpoint-2"
    copied.parent.mkdir()
    os.rename(tmp_path / "first" / "checkpoints" / "checkpoint-2", copied)

    def stopped(self, output_dir, **kwargs):
        raise KeyboardInterrupt  # the second signal, as this run's first checkpoint (step 4) is written

    monkeypatch.setattr(Accelerator, "save_state", stopped)
    with pytest.raises(KeyboardInterrupt) as stop:
        trainer.train(make_recipe(output_dir=str(tmp_path / "second"), train__max_steps=6, checkpoint__every_n_steps=2), resume=str(copied))
    assert stop.value.next_step == f"no checkpoint of this run was kept yet: run the same command again (--resume {copied}) to continue from its step 2 again"


def test_a_cut_short_end_resumed_from_a_checkpoint_copied_elsewhere_is_finished_and_the_copy_only_read(make_recipe, monkeypatch, tmp_path):
    """Its outputs were written, then "checkpoint <output_dir>/checkpoints/checkpoint-3 is damaged": the end marked what it
    wrote in a checkpoint looked for in this run's checkpoints/, where the resumed one never was."""
    import shutil

    stopped_while_the_outputs_are_written(make_recipe, monkeypatch, tmp_path / "stopped")
    copied = tmp_path / "copied" / "checkpoint-3"
    shutil.copytree(tmp_path / "stopped" / "checkpoints" / "checkpoint-3", copied)

    resumed = trainer.train(make_recipe(output_dir=str(tmp_path / "other"), **SAMPLED), resume=str(copied))
    assert resumed.saved_files == [tmp_path / "other" / LORA_WEIGHTS_NAME] and resumed.sample_grids[0].is_file()
    state = json.loads((copied / STATE_FILE).read_text())
    assert state[OUTPUTS_PENDING] and state[VALIDATION_PENDING]  # another folder's checkpoint: read, not written


def test_the_end_of_a_run_resumed_from_a_checkpoint_copied_elsewhere_names_that_checkpoint_to_resume(make_recipe, monkeypatch, tmp_path, capfd):
    """Its end (the final samples of a cut-short run) writes no checkpoint in this output_dir: a stop while they were drawn
    said `--resume latest`, which finds none there. It names the checkpoint the run resumed from, which does continue."""
    import shutil

    real_metadata, real_validation, said_as_it_came = training_run.output_metadata, training_run.run_validation, []

    def second_ctrl_c(recipe, step, *args, **kwargs):  # the outputs of the last step cut short, as in the test above
        if step == 3:
            monkeypatch.setattr(training_run, "output_metadata", real_metadata)
            raise KeyboardInterrupt
        return real_metadata(recipe, step, *args, **kwargs)

    monkeypatch.setattr(training_run, "output_metadata", second_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(make_recipe(output_dir=str(tmp_path / "stopped"), **SAMPLED))
    copied = tmp_path / "copied" / "checkpoint-3"
    shutil.copytree(tmp_path / "stopped" / "checkpoints" / "checkpoint-3", copied)

    def ctrl_c_while_drawing(recipe, method, modules, accelerator, step):
        capfd.readouterr()
        signal.raise_signal(signal.SIGINT)  # a first stop: said at once, held until the samples are drawn
        said_as_it_came.append(capfd.readouterr().err)
        return real_validation(recipe, method, modules, accelerator, step)

    monkeypatch.setattr(training_run, "run_validation", ctrl_c_while_drawing)
    trainer.train(make_recipe(output_dir=str(tmp_path / "other"), **SAMPLED), resume=str(copied))
    assert said_as_it_came[0].endswith(f"--resume {copied} then draws them, without training "
                                       f"(finetune train {tmp_path / 'other' / 'recipe_as_run.yaml'} --resume {copied})\n"), said_as_it_came  # fmt: skip
    assert not (tmp_path / "other" / "checkpoints").exists()  # `--resume latest` had nothing there to resume
    monkeypatch.setattr(training_run, "run_validation", real_validation)
    (tmp_path / "other" / "samples" / "step-000003.png").unlink()  # as a second stop leaves it: the command draws it
    again = trainer.train(make_recipe(output_dir=str(tmp_path / "other"), **SAMPLED), resume=str(copied))
    assert again.sample_grids[0] == tmp_path / "other" / "samples" / "step-000003.png" and again.sample_grids[0].is_file()


def test_a_second_stop_while_the_final_samples_of_an_end_resumed_from_a_copy_are_drawn_says_they_are_left(make_recipe, monkeypatch, tmp_path):
    """The cut-short end of a run resumed from a checkpoint copied from another folder writes its outputs, then draws its
    final samples: a second Ctrl-C there said "no checkpoint was kept; the run's outputs are in ..." and nothing of the
    samples still to draw, which the same command draws."""
    import shutil

    stopped_while_the_outputs_are_written(make_recipe, monkeypatch, tmp_path / "stopped")
    copied = tmp_path / "copied" / "checkpoint-3"
    shutil.copytree(tmp_path / "stopped" / "checkpoints" / "checkpoint-3", copied)

    def second_ctrl_c(recipe, method, modules, accelerator, step):
        raise KeyboardInterrupt

    monkeypatch.setattr(training_run, "run_validation", second_ctrl_c)
    other = tmp_path / "other"
    with pytest.raises(KeyboardInterrupt) as stop:
        trainer.train(make_recipe(output_dir=str(other), **SAMPLED), resume=str(copied))
    assert (other / LORA_WEIGHTS_NAME).is_file()
    assert stop.value.next_step == (f"the run's outputs are in {other}; its final samples are still to draw: --resume {copied} draws them, "
                                    f"without training (finetune train {other / 'recipe_as_run.yaml'} --resume {copied})")  # fmt: skip


@pytest.mark.parametrize("outputs_written", [False, True])
def test_what_is_left_of_an_end_resumed_from_a_copy_that_wanted_no_samples(tmp_path, outputs_written):
    """The same end, its copy naming its outputs only (no final samples wanted): the line said "run the same command again
    ... to continue from its step 3 again" with nothing left to train, or nothing of its outputs being there."""
    from finetune.training.run_end import _what_is_left

    copied, output_dir = tmp_path / "copied" / "checkpoint-3", tmp_path / "other"
    copied.mkdir(parents=True)
    (copied / STATE_FILE).write_text(json.dumps({"step": 3, "max_steps": 3, OUTPUTS_PENDING: True, VALIDATION_PENDING: False}))
    output_dir.mkdir()
    if outputs_written:
        (output_dir / LORA_WEIGHTS_NAME).write_bytes(b"weights")
    expected = (f"the run trained to its end and its outputs are in {output_dir}: nothing is left to do" if outputs_written else
                f"the run trained to its end; --resume {copied} writes its outputs, without training "
                f"(finetune train {output_dir / 'recipe_as_run.yaml'} --resume {copied})")  # fmt: skip
    assert _what_is_left(output_dir, output_dir / "checkpoints", 3, copied) == expected
