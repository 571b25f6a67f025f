"""A run's length in epochs (train.max_epochs) and saves and samples at epoch ends (every_n_epochs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
from finetune.checkpoints.run_files import STATE_FILE, list_checkpoints
from finetune.config.recipe_loading import load_recipe
from finetune.data.batches import ItemLayout
from finetune.errors import FinetuneError
from finetune.formats.kohya import load_lora, to_kohya
from finetune.formats.lora_export import export_lora
from finetune.training.run_length import STEPS_BY_SHAPE, EpochCount, due, epoch_count, planned_steps, run_sampler
from finetune.training.trainer import train


def test_epochs_are_counted_in_micro_batches_and_end_inside_an_accumulated_step(make_recipe):
    # 3 micro-batches an epoch, 2 per optimizer step: epochs end in steps 2 (micro-batch 3 of 4) and 3 (6 of 6).
    assert [list(EpochCount(2, 3).ended_by(step)) for step in range(1, 7)] == [[], [1], [2], [], [3], [4]]
    assert [list(EpochCount(1, 2).ended_by(step)) for step in range(1, 5)] == [[], [1], [], [2]]
    # An epoch shorter than a step (2 micro-batches, 4 a step): each step ends two, and every one counts.
    assert [list(EpochCount(4, 2).ended_by(step)) for step in range(1, 4)] == [[1, 2], [3, 4], [5, 6]]
    assert [due(step, 0, EpochCount(4, 2).ended_by(step), 3) for step in range(1, 4)] == [False, True, True]
    recipe = make_recipe(train__max_steps=None, train__max_epochs=3, train__gradient_accumulation_steps=2)
    assert planned_steps(recipe.train, 3) == 5  # 9 micro-batches: the 5th step completes the third epoch
    assert planned_steps(make_recipe(train__max_steps=7).train, 3) == 7
    assert [due(step, 0, EpochCount(1, 2).ended_by(step), 2) for step in range(1, 9)] == [False, False, False, True] * 2
    assert [due(step, 3, range(0), 2) for step in range(1, 7)] == [False, False, True, False, False, True]
    # The fewest epochs that train past a step: with 4 micro-batches a step and 2 an epoch, 5 and 6 epochs are both 3 steps.
    accumulating = make_recipe(train__max_steps=None, train__max_epochs=5, train__gradient_accumulation_steps=4).train
    assert [planned_steps(accumulating.model_copy(update={"max_epochs": e}), 2) for e in (5, 6, 7)] == [3, 3, 4]
    assert EpochCount(accumulating.gradient_accumulation_steps, 2).to_continue(3) == 7


def test_max_steps_and_max_epochs_take_one_length(tmp_path, make_recipe):
    with pytest.raises(FinetuneError, match=r"train.max_steps \(4\) and train.max_epochs \(2\) both set the run's length: keep one"):
        make_recipe(train__max_epochs=2)
    with pytest.raises(FinetuneError, match=r"train.max_steps is null: set it, or train.max_epochs"):
        make_recipe(train__max_steps=None)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"data": {"image_dir": "x"}, "train": {"max_steps": 1500}}))
    # On the command line, one length replaces the recipe's other; both there clash as in a file.
    assert (load_recipe(path, ["train.max_epochs=10"]).train.max_steps, load_recipe(path, ["train.max_epochs=10"]).train.max_epochs) == (None, 10)
    path.write_text(yaml.safe_dump({"data": {"image_dir": "x"}, "train": {"max_epochs": 10}}))
    assert (load_recipe(path, ["train.max_steps=20"]).train.max_steps, load_recipe(path, ["train.max_steps=20"]).train.max_epochs) == (20, None)
    with pytest.raises(FinetuneError, match=r"both set the run's length"):
        load_recipe(path, ["train.max_steps=20", "train.max_epochs=3"])
    with pytest.raises(FinetuneError, match=r"optimizer.warmup_steps \(5\) must be below train.max_steps \(4\)"):
        make_recipe(optimizer__warmup_steps=5)


def test_a_run_of_epochs_saves_and_samples_at_epoch_ends_and_resumes_for_more(make_recipe, capsys, monkeypatch):
    import finetune.training.trainer as trainer

    # 4 images in batches of 2: two steps an epoch, so 3 epochs are 6 steps.
    recipe = make_recipe(train__max_steps=None, train__max_epochs=3, checkpoint__every_n_epochs=2, validation__every_n_epochs=1,
                         validation__prompts=["a red circle"], validation__images_per_prompt=1, validation__num_inference_steps=2,
                         validation__at_start=False)  # fmt: skip
    result = train(recipe)
    assert result.final_step == 6 and len(result.losses) == 6
    out = capsys.readouterr().out
    assert "length: 6 steps of 2 images = 3 epochs of 4 images" in out
    assert f"saved {Path(recipe.output_dir) / 'checkpoints' / 'checkpoint-4'} (step 4, 2 epochs)" in out.splitlines()  # said when saved
    assert f"samples: {Path(recipe.output_dir) / 'samples' / 'step-000002.png'}" in out.splitlines()
    checkpoints = Path(recipe.output_dir) / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["checkpoint-4", "checkpoint-6"]  # epoch 2, and the end
    assert [p.name for p in result.sample_grids] == ["step-000002.png", "step-000004.png", "step-000006.png"]
    # Each saved LoRA records its step, the epochs done by then and the run's length, as sd-scripts'
    # ss_steps, ss_epoch and ss_max_train_steps; a checkpoint exports under sd-scripts' step name,
    # with its card showing the run's samples up to its step.
    assert {key: load_lora(result.output_dir / LORA_WEIGHTS_NAME).metadata[key] for key in ("finetune.steps", "finetune.epoch", "finetune.max_steps")} == {
        "finetune.steps": "6", "finetune.epoch": "3", "finetune.max_steps": "6"}  # fmt: skip
    exported, card, _ = export_lora(checkpoints / "checkpoint-4", result.output_dir / "webui", "kohya")
    assert exported.name == "run-step00000004.safetensors"
    metadata = load_lora(exported).metadata | to_kohya(load_lora(exported))[1]
    assert (metadata["ss_steps"], metadata["ss_epoch"], metadata["ss_max_train_steps"]) == ("4", "2", "6")
    assert "| steps | 4 (2 epochs) |" in card.read_text() and "samples/run-step00000004-step-000004.png" in card.read_text()
    saved = yaml.safe_load((Path(recipe.output_dir) / "recipe_as_run.yaml").read_text())
    assert (saved["train"]["max_steps"], saved["train"]["max_epochs"]) == (None, 3)  # the recipe as run loads again

    monkeypatch.setattr(trainer, "load_base_model", lambda *a, **k: pytest.fail("loaded the model"))  # the data's layout gives the steps
    with pytest.raises(FinetuneError, match=r"checkpoint-6 is at step 6 and train.max_epochs 3 ends at step 6: nothing left to train; "
                                            r"raise train.max_epochs to continue \(e.g. train.max_epochs=4\)"):
        train(recipe, resume="latest")
    monkeypatch.undo()
    longer = make_recipe(train__max_steps=None, train__max_epochs=4, validation__prompts=[])
    assert train(longer, resume="latest").final_step == 8


def test_warmup_longer_than_the_epochs_is_one_line_before_the_model_loads_and_before_overwrite_clears(make_recipe, monkeypatch):
    import finetune.training.trainer as trainer

    earlier = train(make_recipe(train__max_steps=2, checkpoint__every_n_steps=1))
    recipe = make_recipe(train__max_steps=None, train__max_epochs=2, optimizer__warmup_steps=4, optimizer__scheduler="linear")
    monkeypatch.setattr(trainer, "load_base_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(FinetuneError, match=r"optimizer.warmup_steps \(4\) must be below the run's 4 steps \(train.max_epochs 2\)"):
        train(recipe, overwrite=True)
    assert [p.name for p in list_checkpoints(earlier.output_dir / "checkpoints")] == ["checkpoint-1", "checkpoint-2"]  # nothing lost
    one_step = make_recipe(train__max_steps=None, train__max_epochs=1, train__batch_size=4, optimizer__warmup_steps=1, optimizer__scheduler="linear")
    with pytest.raises(FinetuneError, match=r"must be below the run's 1 step \(train.max_epochs 1\)"):  # not "1 steps"
        train(one_step, overwrite=True)
    monkeypatch.undo()
    # Nor by a refusal that comes once the model is set up (the earlier run is cleared only after every check).
    with pytest.raises(FinetuneError, match=r"lora.target_modules: 'no_such_layer' names no layer"):
        train(make_recipe(train__max_steps=2, lora__target_modules=["no_such_layer"]), overwrite=True)
    assert [p.name for p in list_checkpoints(earlier.output_dir / "checkpoints")] == ["checkpoint-1", "checkpoint-2"]


def test_every_epoch_end_counts_when_a_step_ends_several(make_recipe):
    # 4 images in batches of 2 with 4 micro-batches a step: two epochs a step; epoch 3 ends inside step 2.
    recipe = make_recipe(train__max_steps=None, train__max_epochs=6, train__gradient_accumulation_steps=4, checkpoint__every_n_epochs=3)
    result = train(recipe)
    assert result.final_step == 3
    assert [p.name for p in list_checkpoints(result.output_dir / "checkpoints")] == ["checkpoint-2", "checkpoint-3"]


def test_the_run_length_is_also_said_in_epochs(make_recipe, capsys):
    train(make_recipe(train__max_steps=3, train__gradient_accumulation_steps=2))  # 4 images, 2 per micro-batch, 2 micro-batches a step
    assert "length: 3 steps of 4 images = 3 epochs of 4 images" in capsys.readouterr().out.splitlines()
    train(make_recipe(train__max_steps=3, train__batch_size=3), overwrite=True)  # 4 images in batches of 3: one batch an epoch
    assert "length: 3 steps of 3 images = 3 epochs of 3 of the 4 images (each epoch leaves 1 out at random, to fill whole batches)" in capsys.readouterr().out.splitlines()
    from types import SimpleNamespace

    from finetune.training.run_length import run_length_line

    buckets = SimpleNamespace(batches_per_epoch=8, images_per_epoch=24)  # 24 images in buckets, some batches partial
    line = run_length_line(make_recipe(train__max_steps=10, train__batch_size=4).train, 10, buckets, 24, 1)
    assert line == "length: 10 steps of 4 images = 1.25 epochs of 24 images (in 8 batches an epoch: a bucket's last batch may be smaller)"
    line = run_length_line(make_recipe(train__max_steps=9000, train__batch_size=4).train, 9000, buckets, 24, 1)
    assert line.startswith("length: 9000 steps of 4 images = 1125 epochs of 24 images")  # not 1.12e+03


def test_a_run_resumed_with_a_second_batch_counts_each_batchs_steps(make_recipe, capsys, tmp_path):
    """2 steps of 2 images, 2 of 1 image, then 4 a step: the length line said all 4 done were of 1 image (the
    checkpoint's recipe says only its last batch), and without the data's position the epochs counted them so."""
    train(make_recipe(train__batch_size=2, train__max_steps=2))  # 4 images: epoch 1
    train(make_recipe(train__batch_size=1, train__max_steps=4), resume="latest")  # half of epoch 2
    capsys.readouterr()
    train(make_recipe(train__batch_size=2, train__gradient_accumulation_steps=2, train__max_steps=5), resume="latest")
    out = capsys.readouterr().out  # epoch 2's last 2 images are 1 micro-batch, then half of epoch 3
    assert "length: 5 steps (4 done: 2 of 2 images, 2 of 1 image; 1 to go of 4) = 2.5 epochs of 4 images\n" in out
    train(make_recipe(train__batch_size=2, train__gradient_accumulation_steps=2, train__max_steps=6), resume="latest")
    out = capsys.readouterr().out  # the same batch as the checkpoint's last step: its earlier ones had others still
    assert "length: 6 steps (5 done: 2 of 2 images, 2 of 1 image, 1 of 4 images; 1 to go of 4) = 3.5 epochs of 4 images\n" in out

    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-4"
    state = json.loads((checkpoint / STATE_FILE).read_text())
    assert state[STEPS_BY_SHAPE] == [[2, 1, 1, 2], [1, 1, 1, 2]]
    now = make_recipe(train__batch_size=1).train
    del state["data_order"]  # where the position does not say the epochs: counted from each batch's steps, 1 + 0.5
    (checkpoint / STATE_FILE).write_text(json.dumps(state))
    counted = lambda: epoch_count(ItemLayout(None, 4), now, 1, checkpoint, sampler=run_sampler(ItemLayout(None, 4), now, 1, 0, 3, checkpoint))
    assert counted().at(4) == 1.5
    for other in ([[2, 1, 1, 2]], [[2, 1, 1, 2], [2, 1, 1, 2]]):  # not its 4 steps, or not ending at its recipe's batch (one edited): all at its last
        (checkpoint / STATE_FILE).write_text(json.dumps({**state, STEPS_BY_SHAPE: other}))
        assert counted().at(4) == 1.0
    for wrong in ([[2, 1, 1, 3, 0]], [[2, 1, 1, 0]], [], "4"):
        (checkpoint / STATE_FILE).write_text(json.dumps({**state, STEPS_BY_SHAPE: wrong}))
        with pytest.raises(FinetuneError, match=rf"^checkpoint {checkpoint}: its {STEPS_BY_SHAPE} \(.*\) is not a list of .*resume from another checkpoint"):
            counted()


def test_a_resume_on_other_processes_at_the_same_global_batch_says_it_stays(make_recipe, tmp_path):
    """2 processes of batch 1 resumed by 1 of batch 2: the warning said the global batch "changes from 2 to 2"."""
    from finetune.training.run_length import resume_warnings

    order = {"order": "this run's", "epoch": 0, "dealt": [[2, 2, 1]]}
    state = {"step": 1, "max_steps": 4, "processes": 2, "recipe": {"train.batch_size": 1}, "data_order": order}
    lines = resume_warnings(tmp_path / "checkpoint-1", state, make_recipe(train__batch_size=2, train__max_steps=4), 4, 1, "this run's")
    assert lines == ["warning: checkpoint-1 was trained by 2 processes, this run has 1: the global batch stays 2 images per micro-step "
                     "(the data continue where they stopped)"]
    assert resume_warnings(tmp_path / "checkpoint-1", state, make_recipe(train__batch_size=1, train__max_steps=4), 4, 1, "this run's") == [
        "warning: checkpoint-1 was trained by 2 processes, this run has 1: the global batch changes from 2 to 1 images per micro-step "
        "(the data continue where they stopped)"]
