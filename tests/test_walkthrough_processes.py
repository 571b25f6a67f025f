"""Several processes as a user runs them (2 CPU processes over gloo, see tests/test_distributed.py): what each
process says, and how a run continues at --resume with another number of processes or another length."""

import json
from fractions import Fraction
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from ports import free_port
from test_distributed import RESUME_IS_EXACT, assert_same_weights, launch, write

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
from finetune.checkpoints.run_files import STATE_FILE, read_state
from finetune.data.batches import ItemLayout, make_batch_sampler
from finetune.errors import FinetuneError
from finetune.training.run_length import EpochCount, StepShape, epoch_count, planned_steps, resume_warnings, run_length_line
from finetune.training.trainer import train


@pytest.mark.slow  # two launched machines on loopback under DeepSpeed: ~30 s
def test_only_the_main_process_says_the_checkpoints_it_saved(make_recipe, tmp_path):
    """Two machines of one process each, with the README's DeepSpeed config (ZeRO-2): the second machine's first process
    (LOCAL_RANK 0, rank 1) said 'saved .../checkpoint-1' for a folder the main machine wrote, which need not be on its own
    disk. In the same launch a second run resumes from that checkpoint and ends where the first did."""
    recipe = make_recipe(output_dir=str(tmp_path / "machines"), train__batch_size=1, train__max_steps=2, checkpoint__every_n_steps=1)
    resumed = make_recipe(output_dir=str(tmp_path / "resumed"), train__batch_size=1, train__max_steps=2)
    checkpoint = Path(recipe.output_dir) / "checkpoints" / "checkpoint-1"
    runs = [write(recipe, tmp_path / "machines.yaml"), "--resume", checkpoint, write(resumed, tmp_path / "resumed.yaml")]
    common = ["--config_file", "accelerate_config.yaml", "--num_processes", "2", "--num_machines", "2", "--main_process_ip", "127.0.0.1",
              "--main_process_port", str(free_port())]  # fmt: skip
    machines = [launch([*common, "--machine_rank", str(rank)], *runs) for rank in (0, 1)]
    main_out, other_out = [machine.communicate(timeout=300)[0] for machine in machines]
    assert [machine.returncode for machine in machines] == [0, 0]
    assert "training on 2 processes (distributed: deepspeed)" in main_out
    assert f"saved {checkpoint} (step 1" in main_out
    assert "saved" not in other_out, other_out
    adapters = [load_file(Path(run.output_dir) / LORA_WEIGHTS_NAME) for run in (recipe, resumed)]
    assert_same_weights(adapters[1], adapters[0], exact=RESUME_IS_EXACT)  # bit for bit on the CPU


def test_a_resume_that_changes_the_length_of_a_decaying_schedule_says_what_the_learning_rate_does(make_recipe, capsys):
    """A longer train.max_steps at --resume lays a cosine or linear schedule out again over the new length: the
    learning rate jumped (here from 0, where the 2-step schedule ended, to half of optimizer.lr), unsaid."""
    first = train(make_recipe(train__max_steps=2, optimizer__scheduler="cosine", optimizer__warmup_steps=0))
    checkpoint = first.output_dir / "checkpoints" / "checkpoint-2"
    assert read_state(checkpoint)["max_steps"] == 2
    capsys.readouterr()
    train(make_recipe(train__max_steps=4, optimizer__scheduler="cosine", optimizer__warmup_steps=0), resume="latest")
    assert ("warning: checkpoint-2 was trained on a cosine schedule of 2 steps, this run has 4: the schedule is laid out again "
            "over 4 steps, so at step 2 the learning rate goes from 0% to 50% of optimizer.lr (0.001) and decays to 0 at step 4\n"
            ) in capsys.readouterr().out  # fmt: skip

    # Inside the old schedule it says how to keep it; where the length is in epochs, that is for train.max_epochs to say.
    state = {"step": 2, "max_steps": 4, "processes": 1}
    assert resume_warnings(checkpoint, state, make_recipe(train__max_steps=4), 4, 2) == [  # 1 -> 2 processes: "1 process", not "1 processes"
        "warning: checkpoint-2 was trained by 1 process, this run has 2: the global batch changes from 2 to 4 images per micro-step (and the data order with it)"]
    # A checkpoint that recorded where its data stood (finetune.data.order): the new global batch takes them up there.
    data_order = read_state(checkpoint)["data_order"]
    assert resume_warnings(checkpoint, {**state, "data_order": data_order}, make_recipe(train__max_steps=4), 4, 2, data_order["order"])[0].endswith(
        "images per micro-step (the data continue where they stopped)")
    # Unless this run's order is another (another seed, other images): the order starts again then.
    assert resume_warnings(checkpoint, {**state, "data_order": data_order}, make_recipe(train__max_steps=4), 4, 2, "another order")[0].endswith(
        "images per micro-step (and the data order with it)")
    linear = make_recipe(train__max_steps=8, optimizer__scheduler="linear", optimizer__warmup_steps=0)
    assert resume_warnings(checkpoint, state, linear, 8, 1) == [
        "warning: checkpoint-2 was trained on a linear schedule of 4 steps, this run has 8: the schedule is laid out again over 8 "
        "steps, so at step 2 the learning rate goes from 50% to 75% of optimizer.lr (0.001) and decays to 0 at step 8; to keep "
        "the old schedule, resume with train.max_steps=4"]  # fmt: skip
    # With another train.batch_size too: the checkpoint's global batch was 2 processes x its batch of 2.
    halved = {"step": 2, "processes": 2, "recipe": {"train.batch_size": 2, "train.max_steps": 4}}
    assert resume_warnings(checkpoint, halved, make_recipe(train__batch_size=1, train__max_steps=4), 4, 1)[0].startswith(
        "warning: checkpoint-2 was trained by 2 processes, this run has 1: the global batch changes from 4 to 1 images per micro-step")
    warming_up = make_recipe(train__max_steps=8, optimizer__scheduler="linear", optimizer__warmup_steps=3)  # the same rate at step 2, not later
    assert resume_warnings(checkpoint, state, warming_up, 8, 1) == [
        "warning: checkpoint-2 was trained on a linear schedule of 4 steps, this run has 8: the schedule is laid out again over 8 "
        "steps, so the learning rate decays to 0 at step 8, not 4; to keep the old schedule, resume with train.max_steps=4"]  # fmt: skip
    epochs = make_recipe(train__max_steps=None, train__max_epochs=4, optimizer__scheduler="linear", optimizer__warmup_steps=0)
    assert resume_warnings(checkpoint, state, epochs, 8, 1)[0].endswith("decays to 0 at step 8")
    # Schedules that do not follow the length, and checkpoints of the same length: nothing to say.
    for scheduler, warmup in (("constant", 0), ("constant_with_warmup", 1)):
        assert resume_warnings(checkpoint, state, make_recipe(train__max_steps=8, optimizer__scheduler=scheduler, optimizer__warmup_steps=warmup), 8, 1) == []
    assert resume_warnings(checkpoint, state, linear, 4, 1) == []
    # A checkpoint written before the planned steps were kept: the length its recipe gave.
    assert len(resume_warnings(checkpoint, {"step": 2, "recipe": {"train.max_steps": 4}}, linear, 8, 1)) == 1


def test_the_length_line_counts_a_checkpoints_steps_at_the_processes_that_trained_them(make_recipe, tmp_path):
    """1 -> 2 processes: the checkpoint's 4 steps were 4 images each (2 epochs of 8), the 2 left are 8 each.
    Every step was counted at the new batch (said: 6 epochs)."""
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / STATE_FILE).write_text(json.dumps({"step": 4, "processes": 1}))
    train_config = make_recipe(train__batch_size=2, train__gradient_accumulation_steps=2, train__max_steps=6).train
    layout = ItemLayout(None, 8)
    sampler = make_batch_sampler(layout, 2, 2, 0, 0)

    def line(resume_from, processes=2, sampler=sampler, train_config=train_config, layout=layout):
        return run_length_line(train_config, 6, sampler, len(layout), processes, epoch_count(layout, train_config, processes, resume_from))

    assert line(checkpoint) == "length: 6 steps (4 done of 4 images by 1 process, 2 to go of 8) = 4 epochs of 8 images"
    assert line(None) == "length: 6 steps of 8 images = 6 epochs of 8 images"  # a new run
    (checkpoint / STATE_FILE).write_text(json.dumps({"step": 4, "processes": 2}))
    assert line(checkpoint) == "length: 6 steps of 8 images = 6 epochs of 8 images"
    # Buckets: the checkpoint's processes batched them otherwise (3 + 3 images: 2 batches of 4 at 2 processes, 4 of 2 at 1).
    buckets = ItemLayout([(64, 64)] * 3 + [(64, 32)] * 3, 6)
    (checkpoint / STATE_FILE).write_text(json.dumps({"step": 2, "processes": 2}))
    assert line(checkpoint, 1, make_batch_sampler(buckets, 2, 1, 0, 0), make_recipe(train__batch_size=2).train, buckets).startswith(
        "length: 6 steps (2 done of 4 images by 2 processes, 4 to go of 2) = 2 epochs of 6 images")


def test_a_run_of_epochs_resumed_with_another_number_of_processes_trains_the_epochs_left(make_recipe):
    """Its steps were counted at the new batch: 2 -> 1 processes trained epochs again (here 3 would be 4), and
    1 -> 2 found 'nothing left to train' in a run half done."""
    epochs = dict(train__max_steps=None, train__batch_size=2, checkpoint__every_n_epochs=1)
    first = train(make_recipe(train__max_epochs=1, **epochs))  # 4 images in batches of 2: 2 steps
    state_file = first.output_dir / "checkpoints" / "checkpoint-2" / STATE_FILE
    two = make_batch_sampler(ItemLayout(None, 4), 2, 2, 0, make_recipe().seed).position_after(2)  # where their data stand
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "processes": 2, "data_order": two}))  # as 2 processes write it: 2 epochs
    with pytest.raises(FinetuneError, match=r"is at step 2 and train.max_epochs 2 ends at step 2: nothing left to train; .*train.max_epochs=3\)"):
        train(make_recipe(train__max_epochs=2, **epochs), resume="latest")
    resumed = train(make_recipe(train__max_epochs=3, **epochs), resume="latest")
    assert resumed.final_step == 4  # the third epoch's 2 steps at 2 images
    with safe_open(str(resumed.saved_files[0]), "pt") as adapter:
        assert adapter.metadata()["finetune.epoch"] == "3"

    # 1 -> 2 processes: 4 steps of 2 images (2 accumulated) are 2 epochs of 8 images, the third is 1 step of 8.
    checkpoint_state = {"step": 4, "processes": 1}
    count = EpochCount(2, 2, 4, Fraction(2), StepShape(2, 1, 2))
    assert count == epoch_count(ItemLayout(None, 8), make_recipe(train__batch_size=2, train__gradient_accumulation_steps=2).train, 2, write_state(state_file.parent, checkpoint_state))
    three = make_recipe(train__max_epochs=3, train__gradient_accumulation_steps=2, **epochs).train
    assert (planned_steps(three, count), list(count.ended_by(5)), count.at(5)) == (5, [3], 3.0)


def write_state(checkpoint: Path, state: dict) -> Path:
    (checkpoint / STATE_FILE).write_text(json.dumps(state))
    return checkpoint


def test_a_resume_with_another_batch_size_or_accumulation_counts_the_checkpoints_steps_at_their_batch(make_recipe, tmp_path):
    """Lowered to a batch of 1 after 2 steps of 2 images (1 epoch of 4), or to 1 micro-batch a step after 2 of 2
    accumulated: the checkpoint's steps were counted at the new batch (half an epoch), and a run of 2 epochs
    trained 1.5 more."""
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    layout, two_epochs = ItemLayout(None, 4), dict(train__max_steps=None, train__max_epochs=2)
    for then in ({"train.batch_size": 2, "train.gradient_accumulation_steps": 1}, {"train.batch_size": 1, "train.gradient_accumulation_steps": 2}):
        write_state(checkpoint, {"step": 2, "processes": 1, "recipe": then})
        now = make_recipe(train__batch_size=1, train__gradient_accumulation_steps=1, **two_epochs).train
        count = epoch_count(layout, now, 1, checkpoint)
        assert (count.at(2), planned_steps(now, count)) == (1.0, 6), then  # 1 epoch done, the second is 4 steps of 1 image
        line = run_length_line(now, 6, make_batch_sampler(layout, 1, 1, 0, 0), 4, 1, count)
        assert line == "length: 6 steps (2 done of 2 images, 4 to go of 1) = 2 epochs of 4 images"
