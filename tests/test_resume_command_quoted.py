"""The commands run_end's lines give to finish a run (a stop after its last step, a second stop during its end) are to be
copied: an output_dir with a space was given unquoted, and the shell split it (recipe_loading's own line quotes it, 26ea371)."""

import json
import shlex
import signal
from types import SimpleNamespace

from finetune.checkpoints.run_files import STATE_FILE
import finetune.training.run_end as run_end


def test_the_resume_commands_of_a_runs_end_quote_its_recipe_for_the_shell(tmp_path, monkeypatch):
    output_dir = tmp_path / "my runs" / "lora"
    said = []
    monkeypatch.setattr(run_end, "say", said.append)
    run_end._say_skipped(SimpleNamespace(final_step=4, stopped_by=0), signal.SIGINT, output_dir)
    command = said[0].rsplit("(", 1)[1].rstrip(")")
    assert shlex.split(command) == ["finetune", "train", str(output_dir / "recipe_as_run.yaml"), "--resume", "latest"], said

    checkpoint = output_dir / "checkpoints" / "checkpoint-2"  # a second stop before the last step's checkpoint
    checkpoint.mkdir(parents=True)
    (checkpoint / STATE_FILE).write_text(json.dumps({"step": 2, "max_steps": 4}))
    line = run_end._what_is_left(output_dir, output_dir / "checkpoints", 4)
    command = line.split("(", 1)[1].split(")")[0]
    assert shlex.split(command) == ["finetune", "train", str(output_dir / "recipe_as_run.yaml"), "--resume", "latest"], line


def test_the_first_stop_during_the_final_samples_quotes_its_command_too(tmp_path):
    """The line a first stop says while the final samples are drawn (7c6900a) was merged beside d91a926 with its command
    unquoted: the shell split an output_dir with a space."""
    output_dir = tmp_path / "my runs" / "lora"
    line = run_end._finishing_the_samples(4, output_dir)(signal.SIGINT)
    command = line.rsplit("(", 1)[1].rstrip(")")
    assert shlex.split(command) == ["finetune", "train", str(output_dir / "recipe_as_run.yaml"), "--resume", "latest"], line


def test_under_torchrun_the_first_stop_during_the_final_samples_says_the_launcher_ends_them(tmp_path, monkeypatch):
    """Under torchrun (accelerate launch of several processes) a stop comes through the launcher's agent, which kills the
    processes after its shutdown timeout, samples finished or not: the line said only that they were being finished."""
    output_dir = tmp_path / "run"
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    line = run_end._finishing_the_samples(4, output_dir)(signal.SIGINT)
    assert "A second Ctrl-C stops now, as does the launcher 30 s after a stop sent to it (torchrun's shutdown timeout: export " \
           "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600 before accelerate launch for longer samples), and --resume latest then draws them" in line, line
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")
    assert "as does the launcher 600 s after" in run_end._finishing_the_samples(4, output_dir)(signal.SIGINT)
    monkeypatch.delenv("LOCAL_RANK")  # one process, no torchrun: nothing ends it but a second stop
    assert "launcher" not in run_end._finishing_the_samples(4, output_dir)(signal.SIGINT)


def test_a_run_resumed_from_a_checkpoint_elsewhere_is_told_to_resume_that_checkpoint_quoted(tmp_path, monkeypatch):
    """The end of a run resumed from another folder's checkpoint keeps none in its own output_dir: its lines said
    `--resume latest`, which finds nothing there. They name that checkpoint, quoted as the recipe is."""
    output_dir, copied = tmp_path / "lora", tmp_path / "my copies" / "checkpoint-4"
    said = []
    monkeypatch.setattr(run_end, "say", said.append)
    run_end._say_skipped(SimpleNamespace(final_step=4, stopped_by=0), signal.SIGINT, output_dir, copied)
    for line in (said[0], run_end._finishing_the_samples(4, output_dir, copied)(signal.SIGINT)):
        command = line.rsplit("(", 1)[1].rstrip(")")
        assert shlex.split(command) == ["finetune", "train", str(output_dir / "recipe_as_run.yaml"), "--resume", str(copied)], line
        assert f"--resume {shlex.quote(str(copied))} " in line and "latest" not in line, line
