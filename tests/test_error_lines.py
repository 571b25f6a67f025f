"""Under a launch on several machines each machine stops on the error and says it once, naming itself: two
machines' identical 'error: ...' lines, as a job's merged log shows them, did not say which machine each was."""

import yaml

from finetune.cli import main


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
