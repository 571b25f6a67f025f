"""A stop follows its signal: a second SIGTERM during training's final save said "(Ctrl-C)" (the training loop's stop
handler raised a plain KeyboardInterrupt), and a run stopped by SIGTERM exited 130, SIGINT's status, not 143 (128 + 15)."""

import io
import os
import signal
import sys
from types import SimpleNamespace

import pytest

from finetune.cli import main as cli
from finetune.distributed.stopping import StopRequest
from finetune.stop_signals import Terminated


@pytest.fixture(autouse=True)
def sigterm_handler_kept():
    """cli.main makes SIGTERM raise for the rest of its process: put back what pytest had."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize(("sent", "raised"), [(signal.SIGTERM, Terminated), (signal.SIGINT, KeyboardInterrupt)])
def test_a_second_stop_during_a_save_is_raised_as_its_own_signal(sent, raised):
    with StopRequest(SimpleNamespace(num_processes=1)) as stop:
        os.kill(os.getpid(), sent)  # the first: a stop at the next step boundary
        assert stop.agreed() and stop.signal == sent
        with pytest.raises(KeyboardInterrupt) as second:
            os.kill(os.getpid(), sent)  # the second: at once
    stop.close()
    assert type(second.value) is raised


@pytest.mark.parametrize(("stop", "line", "status"), [(Terminated, "stopped (SIGTERM)", 143), (KeyboardInterrupt, "stopped (Ctrl-C)", 130)])
def test_a_command_stopped_exits_as_the_signal_says(monkeypatch, capsys, stop, line, status):
    def stopped(args):
        raise stop

    monkeypatch.setitem(cli.COMMANDS, "check-data", stopped)
    assert cli.main(["check-data"]) == status
    assert capsys.readouterr().err.strip().startswith(f"{line}: files written so far are kept")


@pytest.mark.parametrize(("sent", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_training_run_stopped_at_a_step_exits_as_the_signal_says(monkeypatch, tmp_path, sent, status):
    import finetune.checkpoints.run_lock
    import finetune.cli.run_refusals
    import finetune.config.recipe_loading
    import finetune.data_check.starting_files
    import finetune.data_check.train_inputs
    import finetune.models.native_resolution
    import finetune.training.trainer

    monkeypatch.setattr(finetune.config.recipe_loading, "load_recipe", lambda *a: SimpleNamespace(output_dir=str(tmp_path), data=SimpleNamespace(resolution=512), model=SimpleNamespace(pretrained="", single_file_config=None)))
    monkeypatch.setattr(finetune.data_check.train_inputs, "check_inputs_exist", lambda recipe: None)
    monkeypatch.setattr(finetune.data_check.train_inputs, "check_data_first", lambda recipe, resume_from=None: None)  # nor data
    monkeypatch.setattr(finetune.data_check.starting_files, "check_starting_files", lambda recipe, resuming: None)  # nor the files it starts from
    monkeypatch.setattr(finetune.cli.run_refusals, "check_run_first", lambda *a: None)  # nor train()'s refusals of the run
    monkeypatch.setattr(finetune.models.native_resolution, "far_from_native_line", lambda *a: None)  # the fake recipe names no real base
    monkeypatch.setattr(finetune.training.trainer, "train", lambda *a, **k: SimpleNamespace(interrupted=True, stopped_by=sent))
    assert cli.main(["train", "recipe.yaml"]) == status


def test_a_first_stop_said_at_once_to_a_stderr_without_a_file_descriptor_stops_nothing_else(monkeypatch):
    """StopRequest said the line of a first stop (`said_at_once`, 7c6900a) with os.write on sys.stderr's file descriptor: where
    sys.stderr has none (a caller's StringIO, a notebook's on some systems) the handler raised io.UnsupportedOperation into
    the final samples it meant to let finish."""
    stream = io.StringIO()
    with StopRequest(SimpleNamespace(num_processes=1)) as stop, stop.said_at_once(lambda signum: "finishing the final samples"):
        monkeypatch.setattr(sys, "stderr", stream)
        os.kill(os.getpid(), signal.SIGINT)  # the first stop: no exception here
        monkeypatch.undo()
    stop.close()
    assert stop.requested and stream.getvalue() == "\nfinishing the final samples\n"
