"""A resume whose recipe, output_dir or setup differs from its checkpoint's: the settings changed since it are named
(and the changed optimizer settings used), and each change it cannot continue across is refused in one line before the
model loads (later checkpoints beside it, another run's checkpoints in output_dir, nothing left to train, other trained
weights or parameter groups, another DeepSpeed engine)."""

import json
import re
import shutil
from pathlib import Path

import pytest

from finetune.checkpoints.resume_checks import DEEPSPEED_FOLDER, check_same_engine
from finetune.checkpoints.run_files import STATE_FILE, list_checkpoints
from finetune.data.batches import ItemLayout, make_batch_sampler
from finetune.errors import FinetuneError
from finetune.optim.optimizers import build_lr_scheduler
from finetune.training.trainer import train


def test_resuming_names_the_settings_changed_since_the_checkpoint(make_recipe, capsys):
    train(make_recipe(train__max_steps=2))
    capsys.readouterr()
    train(make_recipe(train__max_steps=3, lora__alpha=8, optimizer__lr=5e-4), resume="latest")  # alpha: 4x the strength so far
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: settings changed")]
    assert lines == ["warning: settings changed since checkpoint-2: lora.alpha 2.0 -> 8.0, optimizer.lr 0.001 -> 0.0005"]


def test_a_change_in_a_list_of_sections_is_named_by_its_item_and_setting(make_recipe, tmp_path):
    """DreamBooth concepts and data.folders are compared setting by setting; a checkpoint that kept such a
    list as one value (made before) does not count the new form, or a concept's new default, as a change."""
    from finetune.checkpoints.resume_changes import changed_settings

    def concepts(*prompts, **extra):
        return make_recipe(method="dreambooth", data__image_dir=None, dreambooth={"concepts": [
            {"instance_dir": str(tmp_path / f"c{i}"), "instance_prompt": prompt, "class_prompt": "a shape", **extra} for i, prompt in enumerate(prompts)]})

    saved = concepts("a sks shape", "a zwx shape").flat_settings()
    assert saved["dreambooth.concepts.1.instance_prompt"] == "a zwx shape" and saved["dreambooth.concepts.0.repeats"] == 1
    assert changed_settings(saved, concepts("a sks shape", "a qrs shape").flat_settings()) == [
        "dreambooth.concepts.1.instance_prompt a zwx shape -> a qrs shape"]
    removed = changed_settings(saved, concepts("a sks shape").flat_settings())
    assert "dreambooth.concepts.1.instance_prompt a zwx shape -> None" in removed  # a concept left out is said
    assert changed_settings(saved, concepts("a sks shape", "a zwx shape", "a qrs shape").flat_settings()) == ["dreambooth.concepts.2 added"]
    given = concepts("a sks shape", "a zwx shape", class_dir=str(tmp_path / "classes")).flat_settings()  # where it was None (not kept)
    assert changed_settings(saved, given) == [f"dreambooth.concepts.{i}.class_dir None -> {tmp_path / 'classes'}" for i in (0, 1)]
    no_folders, folders = make_recipe().flat_settings(), make_recipe(data__folders=[{"path": "."}]).flat_settings()
    assert no_folders["data.folders"] == "[]" and changed_settings(no_folders, folders) == ["data.folders.0 added"]
    dropped = changed_settings(folders, no_folders)  # each setting of the folder left out
    assert "data.folders.0.path . -> None" in dropped and all(line.startswith("data.folders.0.") and line.endswith(" -> None") for line in dropped)
    older = {key: value for key, value in saved.items() if not key.startswith("dreambooth.concepts")}
    older["dreambooth.concepts"] = str([{"instance_dir": str(tmp_path / "c0"), "instance_prompt": "a sks shape"}])  # kept whole, no repeats
    assert changed_settings(older, concepts("a sks shape", "a zwx shape").flat_settings()) == []


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_a_resumed_run_uses_the_optimizer_settings_it_reports_as_changed(make_recipe, monkeypatch, optimizer):
    """The checkpoint restores the optimizer's own settings with its state; the recipe's changed ones win,
    and the schedule continues at its step (linear: the lr at step 3 of 4 is a quarter of the new one)."""
    import finetune.training.trainer as trainer

    built = []
    monkeypatch.setattr(trainer, "build_lr_scheduler", lambda config, opt, steps: built.append((opt, build_lr_scheduler(config, opt, steps))) or built[-1][1])
    settings = {"optimizer__name": optimizer, "optimizer__scheduler": "linear", "train__max_steps": 4}
    train(make_recipe(checkpoint__every_n_steps=2, **settings))
    changed = dict(optimizer__lr=4e-3, optimizer__weight_decay=0.5)
    if optimizer == "adamw":  # adafactor refuses betas and eps of one's own (it uses neither)
        changed.update(optimizer__betas=[0.8, 0.9], optimizer__eps=1e-6)
    lrs = []
    resume = str(Path(make_recipe().output_dir) / "checkpoints" / "checkpoint-2")
    resumed = make_recipe(output_dir=str(Path(make_recipe().output_dir).parent / "resumed"), **{**settings, **changed})
    train(resumed, resume=resume, on_step=lambda step: lrs.append(built[-1][0].param_groups[0]["lr"]))
    group = built[-1][0].param_groups[0]
    assert lrs[0] == pytest.approx(1e-3) and built[-1][1].base_lrs == [4e-3] and group["weight_decay"] == 0.5
    if optimizer == "adamw":
        assert group["betas"] == (0.8, 0.9) and group["eps"] == 1e-6


def test_resuming_an_older_checkpoint_beside_later_ones_says_to_move_them(make_recipe, monkeypatch):
    """Its run would train their steps again: rotation would keep theirs over the new ones, and a later
    --resume latest would pick them. Before anything loads; they are not touched."""
    import finetune.training.trainer as trainer

    first = train(make_recipe(train__max_steps=4, checkpoint__every_n_steps=2))
    checkpoints = first.output_dir / "checkpoints"
    monkeypatch.setattr(trainer, "load_base_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(FinetuneError, match=rf"^--resume checkpoint-2: {checkpoints} also holds later checkpoints of the steps it would train again \(checkpoint-4\): move them out"):
        train(make_recipe(train__max_steps=6), resume=str(checkpoints / "checkpoint-2"))
    assert [p.name for p in list_checkpoints(checkpoints)] == ["checkpoint-2", "checkpoint-4"]
    monkeypatch.undo()
    shutil.move(checkpoints / "checkpoint-4", first.output_dir / "kept-checkpoint-4")
    assert train(make_recipe(train__max_steps=3), resume=str(checkpoints / "checkpoint-2")).final_step == 3


def test_resuming_another_runs_checkpoint_into_a_folder_holding_checkpoints_is_refused(make_recipe, tmp_path, monkeypatch):
    """Continued into an output_dir of another run, its checkpoints were rotated away (checkpoint.keep_last), unasked
    (--overwrite is no resume). Refused before anything loads; a checkpoint copied out of its own run may go back."""
    import finetune.training.trainer as trainer

    theirs = train(make_recipe(output_dir=str(tmp_path / "a"), train__max_steps=4, checkpoint__every_n_steps=2)).output_dir / "checkpoints"
    mine = train(make_recipe(output_dir=str(tmp_path / "b"), train__max_steps=1)).output_dir / "checkpoints"
    monkeypatch.setattr(trainer, "load_base_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(FinetuneError, match=rf"^--resume {theirs / 'checkpoint-4'}: output_dir {mine.parent} holds checkpoints of another run "
                                            rf"\(checkpoint-1\), which this run's would replace and rotate away: set output_dir to a new folder"):  # fmt: skip
        train(make_recipe(output_dir=str(mine.parent), train__max_steps=6, checkpoint__keep_last=1), resume=str(theirs / "checkpoint-4"))
    assert [p.name for p in list_checkpoints(mine)] == ["checkpoint-1"]
    monkeypatch.undo()
    shutil.copytree(theirs / "checkpoint-4", tmp_path / "kept" / "checkpoint-4")
    assert train(make_recipe(output_dir=str(theirs.parent), train__max_steps=5), resume=str(tmp_path / "kept" / "checkpoint-4")).final_step == 5


def test_resuming_where_nothing_is_left_or_with_another_process_count_says_so(make_recipe, monkeypatch, capsys):
    import finetune.training.trainer as trainer

    train(make_recipe(train__max_steps=2))
    checkpoint = list_checkpoints(Path(make_recipe().output_dir) / "checkpoints")[-1]
    monkeypatch.setattr(trainer, "load_base_model", lambda *a, **k: pytest.fail("loaded the model"))
    for max_steps in (2, 1):
        with pytest.raises(FinetuneError, match=rf"checkpoint-2 is at step 2 and train.max_steps is {max_steps}: nothing left to train; raise train.max_steps"):
            train(make_recipe(train__max_steps=max_steps), resume="latest")
    monkeypatch.undo()

    state = json.loads((checkpoint / STATE_FILE).read_text())
    assert state["processes"] == 1
    two = make_batch_sampler(ItemLayout(None, 4), 2, 2, 0, make_recipe().seed).position_after(2)  # where its data stand: epoch 2 begun
    (checkpoint / STATE_FILE).write_text(json.dumps({**state, "processes": 2, "data_order": two}))  # as a 2-process launch writes it
    capsys.readouterr()
    train(make_recipe(train__max_steps=3), resume="latest")
    out = capsys.readouterr().out
    assert "warning: checkpoint-2 was trained by 2 processes, this run has 1: the global batch changes from 4 to 2 images per micro-step" in out
    # Its 2 steps were 2 epochs of the 4 images (at 4 a step), not 1 (at this run's 2): 2.5 epochs in all.
    assert "length: 3 steps (2 done of 4 images by 2 processes, 1 to go of 2) = 2.5 epochs of 4 images\n" in out


def test_resuming_with_another_lora_rank_is_one_line(make_recipe):
    first = train(make_recipe(train__max_steps=2))
    for max_steps in (3, 2):  # (at 2 nothing is left to train too: the change is said first, so one fix is not followed by another error)
        with pytest.raises(FinetuneError, match=r"checkpoint-2 trained other weights or optimizer groups than this recipe would \(lora.rank 4 -> 8\)"):
            train(make_recipe(train__max_steps=max_steps, lora__rank=8), resume="latest")
    # A checkpoint that keeps no recipe (written before it did): the weights' shapes say it when they load.
    state_file = first.output_dir / "checkpoints" / "checkpoint-2" / STATE_FILE
    state_file.write_text(json.dumps({key: value for key, value in json.loads(state_file.read_text()).items() if key != "recipe"}))
    with pytest.raises(FinetuneError, match=r"checkpoint-2 holds .*lora.* of shape \(4, .*\), this recipe's is \(8, .*\) \(another lora.rank\?\)"):
        train(make_recipe(train__max_steps=3, lora__rank=8), resume="latest")


def test_resuming_with_the_same_lora_target_modules_listed_in_another_order_continues(make_recipe):
    """The same layers train in any order of lora.target_modules (peft adapts them in the model's order): a resume that
    listed them otherwise refused its own checkpoint as having "trained other weights" ([to_q, to_k, ...] -> [to_k, to_q, ...])."""
    first = train(make_recipe(train__max_steps=2, lora__target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    train(make_recipe(train__max_steps=3, lora__target_modules=["to_k", "to_out.0", "to_q", "to_v"]), resume="latest")
    assert (first.output_dir / "checkpoints" / "checkpoint-3").is_dir()
    with pytest.raises(FinetuneError, match=re.escape("(lora.target_modules ['to_k', 'to_out.0', 'to_q', 'to_v'] -> ['to_q', 'to_k', 'to_v'])")):
        train(make_recipe(train__max_steps=4, lora__target_modules=["to_q", "to_k", "to_v"]), resume="latest")  # another set still is said


def test_resuming_with_other_trained_modules_or_parameter_groups_is_one_line_naming_the_change(make_recipe, capsys, monkeypatch):
    import finetune.training.trainer as trainer

    first = train(make_recipe(train__max_steps=4, checkpoint__every_n_steps=2, lora__loraplus_lr_ratio=4.0))
    checkpoint = first.output_dir / "checkpoints" / "checkpoint-2"
    changes = ((dict(lora__loraplus_lr_ratio=None), "lora.loraplus_lr_ratio 4.0 -> None"),
               (dict(lora__train_text_encoder=True), "lora.train_text_encoder False -> True"),
               (dict(lora__rank=8), "lora.rank 4 -> 8"),
               (dict(lora__conv_rank=2), "lora.conv_rank None -> 2"),
               (dict(lora__use_dora=True), "lora.use_dora False -> True"),  # its magnitudes: weights the checkpoint has none of
               (dict(method="full", lora__loraplus_lr_ratio=None), "method lora -> full"))  # fmt: skip
    with monkeypatch.context() as patch:  # said before the model loads
        patch.setattr(trainer, "load_base_model", lambda *a, **k: pytest.fail("loaded the model"))
        for changed, named in changes:
            recipe = make_recipe(train__max_steps=6, output_dir=str(first.output_dir) + "-other", **{"lora__loraplus_lr_ratio": 4.0, **changed})
            with pytest.raises(FinetuneError, match="^" + re.escape(f"{checkpoint} trained other weights or optimizer groups than this recipe would ({named}): resume")):
                train(recipe, resume=str(checkpoint))
    # A checkpoint that keeps no recipe (written before it did) is caught when the optimizer's groups load.
    state = json.loads((checkpoint / STATE_FILE).read_text())
    (checkpoint / STATE_FILE).write_text(json.dumps({key: value for key, value in state.items() if key != "recipe"}))
    recipe = make_recipe(train__max_steps=6, output_dir=str(first.output_dir) + "-old", lora__loraplus_lr_ratio=None)
    with pytest.raises(FinetuneError, match=rf"^checkpoint {checkpoint} was written for other trained modules or parameter groups than this recipe's: resume"):
        train(recipe, resume=str(checkpoint))
    (checkpoint / STATE_FILE).write_text(json.dumps(state))
    # Another ratio keeps the groups: it resumes at the new rates, and says so.
    capsys.readouterr()
    train(make_recipe(train__max_steps=6, output_dir=str(first.output_dir) + "-ratio", lora__loraplus_lr_ratio=8.0), resume=str(checkpoint))
    assert "warning: settings changed since checkpoint-2: lora.loraplus_lr_ratio 4.0 -> 8.0" in capsys.readouterr().out


def test_a_checkpoint_resumes_only_under_the_engine_that_wrote_it(tmp_path):
    """DeepSpeed's checkpoints (its files in pytorch_model/) load only at their ZeRO stage and number of
    processes, and ours only without DeepSpeed: each other case is one line, not an assertion deep in DeepSpeed."""
    plain, zero2, zero3 = (tmp_path / name for name in ("plain", "zero2", "zero3"))
    (plain / "trainable_0.safetensors").parent.mkdir()
    (zero2 / DEEPSPEED_FOLDER).mkdir(parents=True)
    (zero2 / DEEPSPEED_FOLDER / "mp_rank_00_model_states.pt").touch()
    (zero3 / DEEPSPEED_FOLDER).mkdir(parents=True)
    (zero3 / DEEPSPEED_FOLDER / "zero_pp_rank_0_mp_rank_00_model_states.pt").touch()
    for checkpoint, saved, stage, processes in ((plain, 2, None, 1), (zero2, 2, 2, 2), (zero2, None, 2, 4), (zero3, 2, 3, 2)):
        check_same_engine(checkpoint, saved, stage, processes)
    refused = {
        (plain, 2, 2, 2): "written without DeepSpeed, this run is under DeepSpeed ZeRO-2 by 2 process",
        (zero2, 2, None, 2): "written under DeepSpeed ZeRO-2 by 2 processes, this run is without DeepSpeed: ",
        (zero2, 2, 3, 2): "written under DeepSpeed ZeRO-2 by 2 process.*, this run is under DeepSpeed ZeRO-3 by 2 process",
        (zero3, 2, 3, 1): "written under DeepSpeed ZeRO-3 by 2 processes, this run is under DeepSpeed ZeRO-3 by 1 process: ",
    }
    for (checkpoint, saved, stage, processes), message in refused.items():
        with pytest.raises(FinetuneError, match=rf"^checkpoint {checkpoint} was {message}.*; resume it as it was written, or start"):
            check_same_engine(checkpoint, saved, stage, processes)
