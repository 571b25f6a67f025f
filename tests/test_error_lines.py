"""Under a launch on several machines each machine stops on the error and says it once, naming itself: two
machines' identical 'error: ...' lines, as a job's merged log shows them, did not say which machine each was. The
other processes of a machine leave the line to its first, and give it the time to say it."""

import yaml

from finetune.cli.main import main
import finetune.cli.main
from finetune.stop_signals import Terminated


def test_each_machine_names_itself_in_its_error_line(tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "train": {"max_step": 1}}))
    for name, value in {"RANK": "2", "LOCAL_RANK": "0", "GROUP_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)  # the second machine's first process, as torchrun starts it
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: machine 1: ") and "max_step" in err[0], err
    monkeypatch.setenv("WORLD_SIZE", "2")  # one machine of 2 processes: nothing to tell apart
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and not err.startswith("error: machine")


def test_the_other_processes_wait_for_the_launcher_quietly_so_the_first_one_says_the_line(tmp_path, capsys, monkeypatch):
    """Exiting at once, the second process of a launch could end it before the first had said the error they both met:
    torchrun stopped the first, and the run ended with no line. It waits for the launcher's SIGTERM, then exits quietly."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "train": {"max_step": 1}}))
    waits = []

    def stopped_by_the_launcher(seconds):
        waits.append(seconds)
        raise Terminated()  # what stop_outside_imports raises for the SIGTERM torchrun sends

    monkeypatch.setattr(finetune.cli.main.time, "sleep", stopped_by_the_launcher)
    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    assert main(["train", str(recipe)]) == 2
    assert waits == [finetune.cli.main.FIRST_PROCESS_GRACE] and waits[0] >= 5
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("LOCAL_RANK", "0")  # the first process: says it, at once
    assert main(["train", str(recipe)]) == 2
    assert waits == [finetune.cli.main.FIRST_PROCESS_GRACE] and "max_step" in capsys.readouterr().err


def test_the_line_is_said_before_the_process_keeps_the_store_up_for_the_others(capsys, monkeypatch):
    """A failed process of a run keeps the launch's store up for the others yet to read its line (at most
    error_exchange.READ_WAIT): waited before the line, an error it met alone was said seconds late."""
    from finetune.errors import FinetuneError

    seen_during_the_wait = []

    def train_failing(args):
        err = FinetuneError("checkpoint-3 could not be written: the disk is full")
        err.said_here, err.after_said = True, lambda: seen_during_the_wait.append(capsys.readouterr().err)
        raise err

    monkeypatch.setitem(finetune.cli.main.COMMANDS, "train", train_failing)
    assert main(["train", "recipe.yaml"]) == 2
    assert seen_during_the_wait == ["error: checkpoint-3 could not be written: the disk is full\n"]
