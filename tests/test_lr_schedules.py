"""optimizer.scheduler's cosine_with_restarts (sd-scripts' and diffusers' hard restarts) and its optimizer.num_cycles."""

import pytest

from finetune.config import OptimizerConfig
from finetune.config.recipe_loading import recipe_from_dict
from finetune.errors import FinetuneError
from finetune.optim.optimizers import schedule_factor

MINIMAL = {"data": {"image_dir": "images"}}


def test_cosine_with_restarts_decays_num_cycles_times_from_the_full_rate():
    """10 steps after a warm-up of 2, in 2 cycles of 4: the rate is whole at 2 and again at 6, falls in between, and is
    0 at the last step."""
    config = OptimizerConfig(scheduler="cosine_with_restarts", warmup_steps=2, num_cycles=2)
    factors = [schedule_factor(config, 10, step) for step in range(11)]
    assert factors[:3] == [0.0, 0.5, 1.0]  # the warm-up
    assert factors[2] > factors[3] > factors[4] > factors[5] > 0 and factors[6] == 1.0  # the restart
    assert factors[6] > factors[7] > factors[8] > factors[9] > factors[10] == 0.0
    one_cycle = OptimizerConfig(scheduler="cosine_with_restarts", warmup_steps=2)
    plain = OptimizerConfig(scheduler="cosine", warmup_steps=2)
    assert [schedule_factor(one_cycle, 10, step) for step in range(10)] == pytest.approx([schedule_factor(plain, 10, step) for step in range(10)])


def test_num_cycles_under_another_schedule_is_refused_and_other_trainers_names_point_to_it():
    with pytest.raises(FinetuneError, match=r"optimizer.num_cycles \(3\) restarts scheduler cosine_with_restarts only: set optimizer.scheduler: "
                                            r"cosine_with_restarts, or remove num_cycles"):  # fmt: skip
        recipe_from_dict({**MINIMAL, "optimizer": {"scheduler": "cosine", "num_cycles": 3}})
    for name in ("lr_scheduler_num_cycles", "lr_num_cycles"):  # sd-scripts', diffusers'
        with pytest.raises(FinetuneError, match=rf"unknown key '{name}' \(here it is 'optimizer.num_cycles'\)"):
            recipe_from_dict({**MINIMAL, name: 3})


def test_a_run_with_restarts_logs_the_rate_starting_again(make_recipe, monkeypatch):
    """The trainer builds the recipe's schedule: train/lr, logged each step, goes back up at the restart."""
    from accelerate import Accelerator

    from finetune.training.trainer import train

    logged = []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, log_kwargs=None: logged.append(values["train/lr"]))
    train(make_recipe(train__max_steps=4, optimizer__lr=1e-3, optimizer__scheduler="cosine_with_restarts", optimizer__num_cycles=2,
                      logging__every_n_steps=1, validation__prompts=[], checkpoint__every_n_steps=0))  # fmt: skip
    # The rate after each step (as logged): half a cycle of 2 steps, then the restart at step 2, then 0 at the end.
    assert logged == pytest.approx([5e-4, 1e-3, 5e-4, 0.0])


def test_a_warm_up_given_as_a_share_of_the_run_is_said_to_count_steps():
    """sd-scripts reads lr_warmup_steps 0.1 as a tenth of the run; here it was pydantic's 'a number with a fractional part'."""
    with pytest.raises(FinetuneError) as raised:
        recipe_from_dict({**MINIMAL, "optimizer": {"warmup_steps": 0.1}})
    assert str(raised.value) == ("recipe: key 'optimizer.warmup_steps': counts steps (sd-scripts reads 0.1 as a share of the run): write that share "
                                 "of train.max_steps, e.g. 100 for a run of 1000 steps (got 0.1)")  # fmt: skip
    assert recipe_from_dict({**MINIMAL, "optimizer": {"warmup_steps": 100.0}}).optimizer.warmup_steps == 100  # a whole number, as before


def test_a_resume_that_changes_the_length_lays_out_each_side_with_its_own_schedule(make_recipe, tmp_path):
    """A checkpoint of 1 cycle over 10 steps resumed at step 4 for 3 cycles over 20: the old side was laid out with the new
    num_cycles (90% at step 4, where its own 1 cycle gave 65%), and train.max_steps=10 alone was said to keep it."""
    from finetune.training.run_length import resume_warnings

    state = {"step": 4, "max_steps": 10, "recipe": {"optimizer.scheduler": "cosine_with_restarts", "optimizer.num_cycles": 1, "optimizer.warmup_steps": 0}}
    recipe = make_recipe(train__max_steps=20, optimizer__scheduler="cosine_with_restarts", optimizer__num_cycles=3)
    assert resume_warnings(tmp_path / "checkpoint-4", state, recipe, 20, 1) == [
        "warning: checkpoint-4 was trained on a cosine_with_restarts schedule of 10 steps, this run has a cosine_with_restarts (3 cycles) "
        "schedule of 20 steps: the schedule is laid out again over 20 steps, so at step 4 the learning rate goes from 65% to 35% of "
        "optimizer.lr (0.001) and decays to 0 at step 20; to keep the old schedule, resume with train.max_steps=10, optimizer.num_cycles=1"]
    # Another scheduler then: each side named with its own (cosine at 4 of 10: 65%; linear at 4 of 20: 80%).
    state["recipe"] = {"optimizer.scheduler": "cosine", "optimizer.warmup_steps": 0}
    lines = resume_warnings(tmp_path / "checkpoint-4", state, make_recipe(train__max_steps=20, optimizer__scheduler="linear"), 20, 1)
    assert lines[0].startswith("warning: checkpoint-4 was trained on a cosine schedule of 10 steps, this run has a linear schedule of 20 steps: "
                               "the schedule is laid out again over 20 steps, so at step 4 the learning rate goes from 65% to 80% ")
