"""What a crash, a stop at the wrong moment or a damaged file leaves: never a lost result, and one line
naming the file where something cannot be read."""

import os
import shutil
import signal

import pytest

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME, STATE_FILE
from finetune.errors import FinetuneError
import finetune.training.trainer as trainer
import finetune.training.training_run as training_run


def test_a_stop_while_the_last_checkpoint_is_written_waits_for_it_and_the_outputs(make_recipe, monkeypatch, tmp_path):
    """After the loop a Ctrl-C (or SIGTERM) interrupted the last checkpoint mid-write and no output was saved
    (only the loop deferred it): now it skips the last samples and waits for the checkpoint and the outputs."""
    real = trainer.ckpt.save_checkpoint

    def stopped_while_saving(accelerator, checkpoints_dir, step, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # handled at once, in this thread, before the write
        return real(accelerator, checkpoints_dir, step, *args, **kwargs)

    monkeypatch.setattr(trainer.ckpt, "save_checkpoint", stopped_while_saving)
    result = trainer.train(make_recipe(output_dir=str(tmp_path / "run"), train__max_steps=2, checkpoint__every_n_steps=0,
                                       validation__prompts=["a shape"], validation__num_inference_steps=1, validation__at_start=False))  # fmt: skip
    assert (result.output_dir / LORA_WEIGHTS_NAME).is_file() and (result.output_dir / "checkpoints" / "checkpoint-2").is_dir()
    assert not result.sample_grids and not result.interrupted


def test_the_outputs_are_on_disk_before_the_last_samples_are_drawn(make_recipe, monkeypatch, tmp_path):
    """A kill (OOM, a scheduler's SIGKILL) while the last grid renders left the last checkpoint and no output:
    `--resume latest` then had nothing left to train. The outputs now come first."""
    real, written_at_last_samples = training_run.run_validation, []

    def validation(recipe, method, modules, accelerator, step):
        if step == recipe.train.max_steps:
            written_at_last_samples.append((tmp_path / "run" / LORA_WEIGHTS_NAME).is_file())
        return real(recipe, method, modules, accelerator, step)

    monkeypatch.setattr(training_run, "run_validation", validation)
    result = trainer.train(make_recipe(output_dir=str(tmp_path / "run"), train__max_steps=2, validation__prompts=["a shape"],
                                       validation__num_inference_steps=1, validation__at_start=False))  # fmt: skip
    assert written_at_last_samples == [True] and len(result.sample_grids) == 1


def test_a_damaged_checkpoint_is_one_line_naming_it(make_recipe, tmp_path):
    common = dict(train__max_steps=4, checkpoint__every_n_steps=2, validation__prompts=[])
    run = trainer.train(make_recipe(output_dir=str(tmp_path / "run"), **common)).output_dir
    damages = {
        "optimizer.bin": lambda path: path.write_bytes(path.read_bytes()[:100]),
        "trainable_0.safetensors": lambda path: path.write_bytes(path.read_bytes()[:50]),
        "trainer_state.json": lambda path: path.write_text('{"step": 4'),
    }
    for name, damage in damages.items():
        copy = tmp_path / name
        shutil.copytree(run, copy)
        damage(copy / "checkpoints" / "checkpoint-4" / name)
        with pytest.raises(FinetuneError, match=rf"checkpoint .*checkpoint-4 is damaged.*{name}.*: move it out of .*checkpoints and resume from the one before it$"):
            trainer.train(make_recipe(output_dir=str(copy), **{**common, "train__max_steps": 6}), resume="latest")
    # A file gone (not a module of other settings: the recipe is the same) is said so too.
    copy = tmp_path / "missing"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "checkpoint-4" / "optimizer.bin").unlink()
    with pytest.raises(FinetuneError, match=r"checkpoint-4 is damaged or incomplete \(optimizer.bin: FileNotFoundError"):
        trainer.train(make_recipe(output_dir=str(copy), **{**common, "train__max_steps": 6}), resume="latest")
    # An earlier checkpoint's damaged state does not stop a resume from the latest.
    (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("")
    resumed = trainer.train(make_recipe(output_dir=str(run), **{**common, "train__max_steps": 6}), resume="latest")
    assert resumed.final_step == 6


def test_a_damaged_disk_cache_entry_is_encoded_again(make_recipe, tmp_path):
    cache = dict(train__cache_latents=True, train__cache_text_embeddings=True, train__cache_dir=str(tmp_path / "cache"),
                 train__max_steps=2, validation__prompts=[])  # fmt: skip
    first = trainer.train(make_recipe(output_dir=str(tmp_path / "first"), **cache))
    entries = sorted((tmp_path / "cache").rglob("*.safetensors"))
    entries[0].write_bytes(entries[0].read_bytes()[:50])
    again = trainer.train(make_recipe(output_dir=str(tmp_path / "again"), **cache))
    assert again.losses == first.losses and entries[0].stat().st_size > 50  # written anew, whole


def test_a_full_disk_while_a_checkpoint_is_written_is_one_line_and_leaves_the_last_good_one(make_recipe, monkeypatch, tmp_path):
    from accelerate import Accelerator

    real, calls = Accelerator.save_state, []

    def full_at_the_second(self, output_dir, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            (tmp_path / "run" / "checkpoints" / ".partial-checkpoint-4" / "optimizer.bin").write_bytes(b"half")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1234 vs 1100")  # torch.save, disk full
        return real(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_at_the_second)
    with pytest.raises(FinetuneError, match=r"could not write checkpoint .*checkpoint-4 \(RuntimeError: .*unexpected pos.*\): make room or fix the "
                                            r"permissions of .*checkpoints, then --resume latest \(the last complete checkpoint is kept\)$"):
        trainer.train(make_recipe(output_dir=str(tmp_path / "run"), train__max_steps=6, checkpoint__every_n_steps=2, validation__prompts=[]))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["checkpoint-2"]


def test_a_folder_is_replaced_so_that_a_crash_at_any_moment_leaves_a_whole_one(tmp_path, monkeypatch):
    """The old folder was deleted before the new one was renamed in: a kill in between left neither."""
    from pathlib import Path

    from finetune.outputs.atomic_files import replace_folder

    for name, content in (("final", "old"), (".partial", "new")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights").write_text(content)
    real_rename = Path.rename
    monkeypatch.setattr(Path, "rename", lambda self, target: (_ for _ in ()).throw(KeyboardInterrupt) if self.name == ".partial" else real_rename(self, target))
    with pytest.raises(KeyboardInterrupt):  # killed between the two renames
        replace_folder(tmp_path / ".partial", tmp_path / "final")
    assert (tmp_path / ".final.old" / "weights").read_text() == "old"  # aside, whole
    with pytest.raises(KeyboardInterrupt):  # killed there again: the old folder aside was removed first, leaving neither
        replace_folder(tmp_path / ".partial", tmp_path / "final")
    assert (tmp_path / ".final.old" / "weights").read_text() == "old"
    monkeypatch.undo()
    replace_folder(tmp_path / ".partial", tmp_path / "final")
    assert (tmp_path / "final" / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_an_output_dir_that_cannot_be_written_is_one_line_before_the_model_loads(make_recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(FinetuneError, match=r"output_dir .*a-file/run: .*a-file is a file, not a folder: give a folder for the run's checkpoints and outputs$"):
        trainer.train(make_recipe(output_dir=str(tmp_path / "a-file" / "run")))
    (tmp_path / "locked").mkdir(mode=0o555)
    real_access = os.access  # the locked folder alone, as for a user who is not root: the data folders stay readable
    monkeypatch.setattr(trainer.ckpt.os, "access", lambda path, mode: "locked" not in str(path) and real_access(path, mode))
    with pytest.raises(FinetuneError, match=r"locked cannot be written to \(permissions, or a read-only disk\): choose another output_dir$"):
        trainer.train(make_recipe(output_dir=str(tmp_path / "locked" / "run")))


def test_sigterm_outside_training_stops_a_command_as_ctrl_c_does(monkeypatch, capsys):
    """It ended the process silently (exit -15) while the data was checked or class images were made."""
    from finetune.cli import main as cli

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setitem(cli.COMMANDS, "check-data", lambda args: os.kill(os.getpid(), signal.SIGTERM))
    try:
        assert cli.main(["check-data", "recipes/quickstart.yaml"]) == 143  # 128 + 15, as a shell reports SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "stopped (SIGTERM): files written so far are kept" in capsys.readouterr().err


def test_a_second_run_in_the_same_output_dir_is_refused_while_the_first_runs(tmp_path):
    """Nothing stopped it: it removed the first run's partial checkpoint and the two overwrote each other."""
    import subprocess
    import sys

    from finetune.checkpoints.run_lock import output_dir_lock

    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); f.write(str(os.getpid())); f.flush(); print('locked', flush=True); time.sleep(60)",
                               str(tmp_path / ".finetune.lock")], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FinetuneError, match=rf"output_dir .* is in use by another run \(process {holder.pid}\): let it finish or stop it"):
            with output_dir_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with output_dir_lock(tmp_path):  # free again once that process is gone
        with output_dir_lock(tmp_path / "another"):
            pass


@pytest.mark.parametrize("text", ["", "null", "[1, 2]", '{"step": 4'])
def test_a_trainer_state_that_is_not_a_json_object_is_one_line(tmp_path, text):
    from finetune.checkpoints.run_files import STATE_FILE, read_state

    (tmp_path / STATE_FILE).write_text(text)
    with pytest.raises(FinetuneError, match=rf"checkpoint .* is damaged \({STATE_FILE}: .*\): move it out of .* and resume from the one before it$"):
        read_state(tmp_path)


def test_a_trainer_state_larger_than_a_record_is_one_line_without_reading_it(tmp_path):
    """Read whole, a damaged trainer_state.json of gigabytes filled the memory before the line that it is damaged."""
    from finetune.checkpoints.run_files import MAX_RECORD_BYTES, STATE_FILE, read_state

    with open(tmp_path / STATE_FILE, "w") as file:
        file.truncate(MAX_RECORD_BYTES + 1)  # sparse: no disk, and nothing read with the bound
    with pytest.raises(FinetuneError, match=rf"^checkpoint {tmp_path} is damaged \({STATE_FILE}: more than the 100 MB a record of finetune's "
                                            r"holds\): move it out of .* and resume from the one before it$"):  # fmt: skip
        read_state(tmp_path)


def test_a_file_system_without_locks_trains_without_one(tmp_path, monkeypatch):
    import fcntl

    from finetune.checkpoints.run_lock import output_dir_lock

    tried = []

    def no_locks(handle, operation):
        tried.append(operation)
        raise OSError(37, "No locks available")  # ENOLCK, as some network mounts answer

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with output_dir_lock(tmp_path / "run"):  # raised nothing: the run goes on
        pass
    assert tried == [fcntl.LOCK_EX | fcntl.LOCK_NB]  # a lock was asked for, and refused
    assert list((tmp_path / "run").iterdir()) == []  # no empty lock file left behind (the lock's own file goes when a run ends)


def test_checkpoints_and_outputs_are_on_the_disk_before_their_names(make_recipe, monkeypatch, tmp_path):
    """A rename publishes only data already flushed (fsync): a power cut after it cannot leave a checkpoint,
    or the adapter file, of empty files in place of the previous one. Nor does trainer_state.json, which marks a
    checkpoint complete before its rename (`run_files.interrupted_checkpoints`), appear before the other files are."""
    from pathlib import Path

    events, real_fsync, real_rename, real_replace, real_write_text = [], os.fsync, Path.rename, Path.replace, Path.write_text
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    monkeypatch.setattr(Path, "rename", lambda self, target: events.append(("rename", str(self))) or real_rename(self, target))

    def replace(self, target):
        events.extend([("rename", str(self)), ("named", str(target))])
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", replace)
    monkeypatch.setattr(Path, "write_text", lambda self, *args, **kwargs: events.append(("named", str(self))) or real_write_text(self, *args, **kwargs))
    result = trainer.train(make_recipe(output_dir=str(tmp_path / "run"), train__max_steps=2, validation__prompts=[]))

    def flushed_before_renamed(partial: Path, files: list[str]) -> bool:
        renamed = events.index(("rename", str(partial)))
        return all(("fsync", str(partial / name)) in events[:renamed] for name in files)

    checkpoint = result.output_dir / "checkpoints" / "checkpoint-2"
    files = [str(path.relative_to(checkpoint)) for path in checkpoint.rglob("*") if path.is_file()]
    assert len(files) >= 4 and flushed_before_renamed(checkpoint.with_name(".partial-checkpoint-2"), files)
    marked = events.index(("named", str(checkpoint.with_name(".partial-checkpoint-2") / STATE_FILE)))
    assert all(("fsync", str(checkpoint.with_name(".partial-checkpoint-2") / name)) in events[:marked] for name in files if name != STATE_FILE)
    assert flushed_before_renamed(result.output_dir / f".{LORA_WEIGHTS_NAME}.partial", [""])


def test_a_kill_while_rotation_deletes_a_checkpoint_leaves_nothing_the_next_save_keeps(make_recipe, monkeypatch, tmp_path):
    """Rotation deleted checkpoint-1 in place: a kill midway left checkpoint-1 without its trainer_state.json, which no
    listing counts, so no rotation or save removed it ever (a full UNet's weights and optimizer state, for good)."""

    class Killed(BaseException):
        pass

    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # what shutil.rmtree had deleted when the SIGKILL came: the state file
        if str(path).endswith("checkpoint-1") and (state := trainer.ckpt.Path(path) / trainer.ckpt.STATE_FILE).is_file():
            state.unlink()
            raise Killed
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(trainer.ckpt.shutil, "rmtree", killed_midway)
    recipe = make_recipe(output_dir=str(tmp_path / "run"), train__max_steps=3, checkpoint__every_n_steps=1, checkpoint__keep_last=1)
    with pytest.raises(Killed):
        trainer.train(recipe)
    monkeypatch.undo()
    trainer.train(recipe, resume="latest")  # from checkpoint-2, saves checkpoint-3
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["checkpoint-3"]


def test_a_kill_while_a_checkpoints_validation_draws_is_drawn_by_the_resumed_run(make_recipe, monkeypatch, tmp_path):
    """At a step both due, the checkpoint is written, then the validation drawn: a kill while it drew (a grid takes minutes
    at full size) left checkpoint-2, whose resume went on to step 3: that step's grid and held-out loss were never drawn."""

    class Killed(BaseException):
        pass

    settings = dict(train__max_steps=4, checkpoint__every_n_steps=2, validation__prompts=["a shape"], validation__num_inference_steps=1,
                    validation__images_per_prompt=1, validation__at_start=False, validation__every_n_steps=2, validation__loss_images=1)  # fmt: skip
    straight = trainer.train(make_recipe(output_dir=str(tmp_path / "straight"), **settings))
    real = training_run.run_validation

    def killed_while_drawing(recipe, method, modules, accelerator, step):
        raise Killed

    monkeypatch.setattr(training_run, "run_validation", killed_while_drawing)
    with pytest.raises(Killed):
        trainer.train(make_recipe(output_dir=str(tmp_path / "killed"), **settings))
    monkeypatch.setattr(training_run, "run_validation", real)
    resumed = trainer.train(make_recipe(output_dir=str(tmp_path / "killed"), **settings), resume="latest")
    assert resumed.validation_losses == straight.validation_losses and [step for step, _ in straight.validation_losses] == [2, 4]
    grids = lambda run: {path.name: path.read_bytes() for path in (tmp_path / run / "samples").glob("*.png")}  # noqa: E731
    assert grids("killed") == grids("straight") and len(grids("straight")) == 2


def test_a_kill_while_a_resume_writes_the_recipe_as_run_keeps_the_one_there(make_recipe, monkeypatch, tmp_path):
    """Every run, a resume too, wrote output_dir's recipe as run again in place: a kill mid-write left it cut short, the run's
    record (or the very recipe resumed: `finetune train outputs/run/recipe_as_run.yaml --resume latest`)."""
    from pathlib import Path

    class Killed(BaseException):
        pass

    trainer.train(make_recipe(output_dir=str(tmp_path / "run"), train__max_steps=2, checkpoint__every_n_steps=1))
    kept = (tmp_path / "run" / "recipe_as_run.yaml").read_text()
    real_write_text = Path.write_text

    def killed_midway(self, text, *args, **kwargs):  # what a kill mid-write leaves: the first half
        if "recipe_as_run.yaml" in self.name:
            real_write_text(self, text[: len(text) // 2], *args, **kwargs)
            raise Killed
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", killed_midway)
    with pytest.raises(Killed):
        trainer.train(make_recipe(output_dir=str(tmp_path / "run"), train__max_steps=3, checkpoint__every_n_steps=1), resume="latest")
    assert (tmp_path / "run" / "recipe_as_run.yaml").read_text() == kept
