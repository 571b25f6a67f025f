"""logging.wandb: a run followed in Weights & Biases as in TensorBoard (the same scalars at the same steps, the validation
grids, the settings as its config), a resume continuing the same W&B run, and a setup wandb cannot log with (no package,
no API key: its prompt held a launched run) said in one line before the data check. Runs log offline (WANDB_MODE=offline)
under tmp_path, read back from wandb's own files (tests/wandb_records.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import build_recipe
from PIL import Image
from test_fast_errors import TRAINING_STACK
from wandb_records import offline_runs

from finetune.config.recipe_loading import load_recipe
from finetune.errors import FinetuneError
from finetune.training.wandb_checks import wandb_problem

ROOT = Path(__file__).resolve().parents[1]
WANDB_VARIABLES = ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL", "NETRC", "WANDB_DIR", "WANDB_CONFIG_DIR")


@pytest.fixture
def wandb_home(monkeypatch, tmp_path) -> Path:
    """A home with no W&B credentials nor settings (HOME, and every variable wandb reads them from, in tmp_path)."""
    for name in WANDB_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    return home


@pytest.fixture
def offline(wandb_home, monkeypatch, tmp_path) -> Path:
    """W&B logging to local files under the returned folder (WANDB_DIR), as `WANDB_MODE=offline` runs do."""
    wandb = pytest.importorskip("wandb", reason="wandb is in the dev extra: pip install -e '.[dev]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    (tmp_path / "wandb-dir").mkdir()
    yield tmp_path / "wandb-dir"
    wandb.teardown()  # wandb reads its settings (WANDB_DIR) once a process: the next test's runs would go into this one's folder


def wandb_recipe(tiny_model, image_folder, run_dir, **overrides):
    """A grid at steps 2 and 4, every step's scalars, TensorBoard and W&B both on."""
    grids = {"validation__prompts": ["a red square"], "validation__every_n_steps": 2, "validation__num_inference_steps": 2,
             "validation__images_per_prompt": 1, "validation__at_start": False}  # fmt: skip
    return build_recipe(tiny_model, image_folder, run_dir, logging__tensorboard=True, logging__every_n_steps=1, logging__wandb__enabled=True,
                        **{**grids, **overrides})  # fmt: skip


def tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "logs" / "finetune"))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_a_run_logs_to_wandb_the_scalars_tensorboard_gets_its_grids_and_its_settings(tiny_model, image_folder, offline, tmp_path):
    from finetune.training.trainer import train

    recipe = wandb_recipe(tiny_model, image_folder, tmp_path / "run", logging__wandb__project="stars", validation__loss_images=1)
    result = train(recipe)
    (run,) = offline_runs(offline)
    assert (run.project, run.name) == ("stars", "run")  # named as its output_dir's folder, unless logging.wandb.run_name names it
    for tag in ("train/loss", "train/lr", "train/epoch", "validation/loss"):
        logged = tensorboard_scalars(tmp_path / "run", tag)
        assert [step for step, _ in run.steps_of(tag)] == [step for step, _ in logged], tag
        assert [value for _, value in run.steps_of(tag)] == pytest.approx([value for _, value in logged], rel=1e-6), tag  # TensorBoard's in float32
    assert [grid.name for grid in result.sample_grids] == ["step-000002.png", "step-000004.png"]
    for grid in result.sample_grids:
        step = int(grid.stem.removeprefix("step-"))
        assert np.array_equal(np.asarray(Image.open(run.image_file("validation", step))), np.asarray(Image.open(grid))), step
    assert run.config == recipe.flat_settings()  # once: a run's config in W&B


def test_a_resumed_run_continues_the_same_wandb_run(tiny_model, image_folder, offline, tmp_path):
    from finetune.training.trainer import train

    train(wandb_recipe(tiny_model, image_folder, tmp_path / "run", train__max_steps=2, checkpoint__every_n_steps=2))
    # An offline run's folder is named by the second it started in and its id: a resume of the same id in the same second wrote into its run's.
    time.sleep(1.0 - time.time() % 1.0 + 0.01)
    train(wandb_recipe(tiny_model, image_folder, tmp_path / "run", train__max_steps=4, checkpoint__every_n_steps=2), resume="latest")
    first, resumed = offline_runs(offline)  # `wandb sync` uploads both into the one run of their id
    assert resumed.run_id == first.run_id
    assert [step for step, _ in first.steps_of("train/loss")] == [1, 2] and [step for step, _ in resumed.steps_of("train/loss")] == [3, 4]
    assert resumed.config["train.max_steps"] == 4  # the settings the resume changed, updated


@pytest.mark.slow  # a launch of 2 processes (30 s and more on 2 busy cores)
def test_two_processes_log_one_wandb_run_from_the_main_process(tiny_model, image_folder, offline, tmp_path):
    from ports import free_port
    from test_distributed import launch, wait, write

    recipe = wandb_recipe(tiny_model, image_folder, tmp_path / "run", train__batch_size=1)
    wait(launch(["--num_processes", "2", "--main_process_port", str(free_port())], write(recipe, tmp_path / "recipe.yaml")))
    (run,) = offline_runs(offline)
    assert [step for step, _ in run.steps_of("train/loss")] == [1, 2, 3, 4] and run.image_file("validation", 4).is_file()


def test_wandb_settings_are_checked_as_the_recipe_loads():
    quickstart = ROOT / "recipes" / "quickstart.yaml"
    assert load_recipe(quickstart, ["logging.wandb.enabled=true"]).logging.wandb.enabled
    for overrides, said in [
        (["logging.wandb.project=stars"], "logging.wandb.project names the W&B run, and logging.wandb.enabled is false"),
        (["logging.wandb=true"], "logging.wandb is a section, not True: set logging.wandb.enabled: true"),
        (["logging.wandb.enabled=true", "logging.wandb.project=team/stars"], "W&B refuses any of / \\ # ? % : in a project's name"),
    ]:  # fmt: skip
        with pytest.raises(FinetuneError) as raised:
            load_recipe(quickstart, overrides)
        assert said in str(raised.value), overrides


def test_wandb_finds_a_key_as_wandb_does_or_needs_none_offline(wandb_home, monkeypatch, tmp_path):
    pytest.importorskip("wandb", reason="wandb is in the dev extra: pip install -e '.[dev]'")
    assert wandb_problem(False) is None
    assert wandb_problem(True).startswith(f"logging.wandb.enabled: no W&B API key (WANDB_API_KEY is not set, and {wandb_home / '.netrc'} has none for api.wandb.ai)")
    (wandb_home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")  # what `wandb login` writes
    assert wandb_problem(True) is None
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")  # a server of one's own: its entry, not api.wandb.ai's
    assert "has none for wandb.example.com" in wandb_problem(True)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_problem(True) is None
    monkeypatch.delenv("WANDB_API_KEY")
    settings = tmp_path / "wandb-dir" / "wandb" / "settings"  # `wandb offline` in the run's folder
    settings.parent.mkdir(parents=True)
    settings.write_text("[default]\nmode = offline\n")
    assert wandb_problem(True) is None
    monkeypatch.setenv("WANDB_MODE", "online")  # the variable before the file, as wandb reads them
    assert wandb_problem(True) is not None


def said_by(argv: list[str], hidden: tuple[str, ...] = ()) -> tuple[int, str, str, list[str]]:
    """`finetune ARGV` in a fresh interpreter, the modules `hidden` as if not installed: its exit status, stdout, stderr, and
    which of the training stack it imported."""
    script = f"""
import contextlib, io, json, sys
for name in {hidden!r}:
    sys.modules[name] = None  # importlib.util.find_spec answers None, as for a package not installed
from finetune.cli.main import main
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    status = main({argv!r})
print(json.dumps([status, out.getvalue(), err.getvalue(), [name for name in {TRAINING_STACK!r} if name in sys.modules]]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return tuple(json.loads(result.stdout))


def test_train_and_check_data_say_a_missing_wandb_or_key_before_the_data_check_without_torch(wandb_home, tmp_path):
    pytest.importorskip("wandb", reason="wandb is in the dev extra: pip install -e '.[dev]'")  # (the key is looked for where it is installed)
    train = ["train", "recipes/quickstart.yaml", "logging.wandb.enabled=true", f"output_dir={tmp_path / 'run'}"]
    status, _, err, imported = said_by(train)
    assert (status, imported) == (2, []) and err.count("\n") == 1, err
    assert err.startswith("error: logging.wandb.enabled: no W&B API key") and "run `wandb login` (or set WANDB_API_KEY) first, or set WANDB_MODE=offline" in err
    assert not (tmp_path / "run").exists()  # refused before the run's folder is made (its lock's, left empty, removed)
    status, _, err, imported = said_by(train, hidden=("wandb",))
    assert (status, imported) == (2, []) and err == ('error: logging.wandb.enabled needs the wandb package, which is not installed: pip install wandb '
                                                     '(or pip install -e ".[wandb]"), or set logging.wandb.enabled=false\n')  # fmt: skip
    status, out, _, _ = said_by(["check-data", "recipes/quickstart.yaml", "logging.wandb.enabled=true"])
    fatal = [line for line in out.splitlines() if line.startswith("fatal: ")]
    assert status == 1 and len(fatal) == 1 and fatal[0].startswith("fatal: logging.wandb.enabled: no W&B API key"), out
    assert out.endswith("result: training would stop: 1 fatal problem; fix it\n"), out


def test_report_to_wandb_given_as_diffusers_takes_it_is_told_its_switch(capsys):
    from finetune.cli.arguments import parse_arguments

    for options, override in ((["--report_to", "wandb"], "logging.wandb.enabled=true"), (["--report_to=tensorboard"], "logging.tensorboard=true")):
        with pytest.raises(SystemExit):
            parse_arguments(["train", "recipes/lora.yaml", *options])
        assert capsys.readouterr().err.splitlines()[-1].endswith(f"recipe keys are given as key=value after the recipe: {override}"), options
