"""TensorBoard after a resume shows one curve: the steps a run logged after its last checkpoint (before a kill, or the later
steps of a run resumed from an older checkpoint; all of a run killed before its first checkpoint) are logged again by the
resumed run, and TensorBoard drew both, a curve doubling back over those steps. The new run's writer purges them (torch's
SummaryWriter(purge_step=...))."""

import gc
import os
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import build_recipe
from forked import run_forked
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from finetune.training.trainer import train

def killed_run(recipe, after_step: int) -> SimpleNamespace:
    """Trains `recipe` in a process of its own (forked: see tests/forked.py) that SIGKILLs itself when step `after_step` is
    done, before that step's log and checkpoint: its `returncode` (-9) and `output`. The writers the run opened are flushed first:
    what their thread writes to disk every flush_secs, as for a kill that long after these steps (this process's own are left alone)."""
    from torch.utils.tensorboard import SummaryWriter

    def writers() -> list:
        return [thing for thing in gc.get_objects() if issubclass(type(thing), SummaryWriter)]  # (isinstance would ask deprecated objects their __class__)

    before = {id(writer) for writer in writers()}

    def killed_after(step):
        if step == after_step:
            for writer in writers():
                if id(writer) not in before:
                    writer.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def run() -> None:
        train(recipe, on_step=killed_after)

    return run_forked(run)


def logged(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of `tag` as TensorBoard reads the run's logs, in the order it draws them."""
    events = EventAccumulator(str(run_dir / "logs" / "finetune"))  # purge_orphaned_data: TensorBoard's default too
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def started_a_second_later(resume: str) -> str:
    """`resume`, once the clock has passed the second the earlier run started its log in. TensorBoard reads a folder's
    event files in the order of their names, which begin with the second a writer started, then the host and process:
    a resume started in the same second by a process of a lower number (this one; the killed run was its child) would
    be read first, and the earlier run's events after it taken for a restart that purges the resumed run's."""
    time.sleep(1.0 - time.time() % 1.0 + 0.01)
    return resume


def assert_one_curve(resumed: list[tuple[int, float]], straight: list[tuple[int, float]], tag: str) -> None:
    """The same steps, each once, and the same values to float rounding: the killed run trained in a process of its own,
    whose thread count can differ from this one's, so its checkpoint's weights may differ in the last bits."""
    assert [step for step, _ in resumed] == [step for step, _ in straight], tag
    assert [value for _, value in resumed] == pytest.approx([value for _, value in straight], rel=1e-5), tag


def logged_recipe(tiny_model, image_folder, run_dir, **overrides):
    """8 steps, each logged, a checkpoint every 3; a rate that changes at each step."""
    return build_recipe(tiny_model, image_folder, run_dir, train__max_steps=8, checkpoint__every_n_steps=3, logging__tensorboard=True,
                        logging__every_n_steps=1, optimizer__scheduler="cosine", optimizer__warmup_steps=2, **overrides)  # fmt: skip


def settings_records(run_dir: Path) -> int:
    """How many times the run's settings went to TensorBoard (HParams): each is a folder of its own, a run in TensorBoard's list."""
    return len(list((run_dir / "logs" / "finetune").glob("*/events.out.tfevents.*")))


@pytest.fixture(scope="module")
def straight_run(tiny_model, image_folder, tmp_path_factory) -> Path:
    """The uninterrupted run of `logged_recipe` that each killed and resumed run below must log as (its logs only read)."""
    run_dir = tmp_path_factory.mktemp("straight") / "straight"
    train(logged_recipe(tiny_model, image_folder, run_dir))
    return run_dir


@pytest.mark.parametrize(("killed_after", "logged_before"), [(6, [1, 2, 3, 4, 5]), (2, [1])])  # after checkpoint-3; before any
def test_a_run_killed_and_resumed_logs_each_step_once(tiny_model, image_folder, straight_run, tmp_path, killed_after, logged_before):
    recipe = logged_recipe(tiny_model, image_folder, tmp_path / "run")
    killed = killed_run(recipe, killed_after)
    assert killed.returncode == -signal.SIGKILL, killed.output[-2000:]
    assert [step for step, _ in logged(tmp_path / "run", "train/loss")] == logged_before
    train(recipe, resume=started_a_second_later("latest"))  # from checkpoint-3, or from the start
    for tag in ("train/loss", "train/lr"):
        assert_one_curve(logged(tmp_path / "run", tag), logged(straight_run, tag), tag)  # each step once, as the resumed run logged it
    assert settings_records(tmp_path / "run") == 1  # the same settings, recorded by the killed run (a fresh start too: its logs hold them)


def grid_steps(run_dir: Path) -> list[int]:
    events = EventAccumulator(str(run_dir / "logs" / "finetune"), size_guidance={"images": 0})
    events.Reload()
    return [event.step for event in events.Images("validation")]


def test_a_grid_drawn_after_its_checkpoint_and_killed_later_is_logged_once_with_its_steps_logs(tiny_model, image_folder, tmp_path):
    """The grid of a checkpoint's step is drawn after the checkpoint is written, and drawn again by a resume from it (which
    cannot know whether the kill came before it was drawn): two grids at step 3, or the train logs of step 3 purged with it."""
    grids = {"validation__prompts": ["a red square"], "validation__every_n_steps": 3, "validation__num_inference_steps": 2,
             "validation__images_per_prompt": 1, "validation__at_start": False}  # fmt: skip
    recipe = logged_recipe(tiny_model, image_folder, tmp_path / "run", **grids)
    train(logged_recipe(tiny_model, image_folder, tmp_path / "straight", **grids))
    killed = killed_run(recipe, 5)
    assert killed.returncode == -signal.SIGKILL and grid_steps(tmp_path / "run") == [3], killed.output[-2000:]
    train(recipe, resume=started_a_second_later("latest"))  # from checkpoint-3, whose grid it draws again
    assert grid_steps(tmp_path / "run") == grid_steps(tmp_path / "straight") == [3, 6, 8]
    for tag in ("train/loss", "train/lr"):
        assert_one_curve(logged(tmp_path / "run", tag), logged(tmp_path / "straight", tag), tag)


@pytest.mark.parametrize("resumed_lr", [None, 2e-3])
def test_a_resume_from_an_older_checkpoint_logs_its_later_steps_once(tiny_model, image_folder, tmp_path, resumed_lr):
    run_dir = tmp_path / "run"
    train(logged_recipe(tiny_model, image_folder, run_dir))
    straight = {tag: logged(run_dir, tag) for tag in ("train/loss", "train/lr")}
    assert [step for step, _ in straight["train/loss"]] == list(range(1, 9)) and settings_records(run_dir) == 1
    for later in ("checkpoint-6", "checkpoint-8"):  # as docs/training.md says: the later ones moved out first
        shutil.move(run_dir / "checkpoints" / later, tmp_path / later)
    resumed = logged_recipe(tiny_model, image_folder, run_dir, **({"optimizer__lr": resumed_lr} if resumed_lr else {}))
    train(resumed, resume=started_a_second_later(str(run_dir / "checkpoints" / "checkpoint-3")))
    if resumed_lr is None:  # the same settings: the same curve, and the settings recorded once
        assert {tag: logged(run_dir, tag) for tag in straight} == straight and settings_records(run_dir) == 1
    else:  # from step 4 on, another curve in place of the earlier one; the new settings recorded too
        rates = logged(run_dir, "train/lr")
        assert [step for step, _ in rates] == list(range(1, 9)) and settings_records(run_dir) == 2
        assert rates[:3] == straight["train/lr"][:3] and rates[3] != straight["train/lr"][3]  # (4, the resumed run's rate)


def test_settings_on_record_are_those_of_a_whole_record_alike(tmp_path):
    from finetune.training.logged_settings import settings_on_record

    settings = {"lora.rank": 4, "optimizer.lr": 0.0001, "validation.prompts": "['a café']", "train.cache_latents": True}
    (tmp_path / "1.5").mkdir()
    (tmp_path / "1.5" / "hparams.yml").write_text(yaml.dump(settings))  # as accelerate writes it
    (tmp_path / "2.5").mkdir()
    (tmp_path / "2.5" / "hparams.yml").write_text("lora.rank: 4\noptimizer.lr: [")  # cut short by a kill
    assert settings_on_record(tmp_path, settings) and not settings_on_record(tmp_path / "missing", settings)
    assert not settings_on_record(tmp_path, {**settings, "optimizer.lr": 0.0002}) and not settings_on_record(tmp_path, {"lora.rank": 4})
