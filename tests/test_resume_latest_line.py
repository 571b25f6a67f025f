"""`--resume latest` where output_dir holds no checkpoint starts at step 0, as a first run: said once the model stack had
loaded, after the data check (minutes on a large folder, for a mistyped output_dir); now before it, and once."""

from PIL import Image

from finetune.checkpoints.run_files import say_fresh_start
from finetune.cli.main import main
from finetune.data_check.checked_once import checks_kept


def test_train_says_resume_latest_found_no_checkpoint_before_its_data_check(tmp_path, capsys):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")  # the data check refuses it: nothing loads after it
    output_dir = tmp_path / "run"
    assert main(["train", "recipes/quickstart.yaml", f"data.image_dir={tmp_path}", f"output_dir={output_dir}", "--resume", "latest"]) == 2
    said = capsys.readouterr()
    assert f"--resume latest: no checkpoint in {output_dir / 'checkpoints'} yet, starting at step 0\n" in said.out
    assert "broken.png" in said.err


def test_the_line_is_said_once_per_run(tmp_path, capsys):
    with checks_kept():  # `finetune train`: the command says it, then train() would
        say_fresh_start(tmp_path / "checkpoints")
        say_fresh_start(tmp_path / "checkpoints")
    assert capsys.readouterr().out.count("no checkpoint in") == 1
    say_fresh_start(tmp_path / "checkpoints")  # train() called alone, twice: two runs, each says it
    say_fresh_start(tmp_path / "checkpoints")
    assert capsys.readouterr().out.count("no checkpoint in") == 2


def test_a_first_save_a_kill_cut_short_is_named_where_no_checkpoint_is_found(tmp_path, capsys):
    """The kill's `.partial-checkpoint-2` went at the first save, unsaid: the run seemed to have lost its checkpoint."""
    (tmp_path / "checkpoints" / ".partial-checkpoint-2").mkdir(parents=True)
    say_fresh_start(tmp_path / "checkpoints")
    assert capsys.readouterr().out == (f"--resume latest: no checkpoint in {tmp_path / 'checkpoints'} yet, starting at step 0 (.partial-checkpoint-2: a "
                                       f"save a kill or a crash cut short, without its trainer_state.json, which no resume can take; the run's first save removes it)\n")
