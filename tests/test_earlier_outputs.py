"""A finished run whose checkpoints the user deleted (a full UNet's are gigabytes) still holds its outputs: a new run in
that output_dir replaced them without a word. It is refused before anything loads, as an earlier run's checkpoints are."""

from __future__ import annotations

import shutil

import pytest

from finetune.checkpoints.earlier_run import guard_earlier_run
from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
from finetune.errors import FinetuneError
from finetune.training.trainer import train
import finetune.training.trainer as trainer_module


def test_a_new_run_keeps_the_outputs_of_a_finished_run_whose_checkpoints_were_deleted(make_recipe, monkeypatch):
    finished = train(make_recipe(train__max_steps=2))
    adapter = finished.output_dir / LORA_WEIGHTS_NAME
    made = adapter.read_bytes()
    shutil.rmtree(finished.output_dir / "checkpoints")
    monkeypatch.setattr(trainer_module, "load_base_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(FinetuneError, match=rf"^output_dir .* holds the outputs of an earlier run \({LORA_WEIGHTS_NAME}\) and no checkpoint to continue: "
                                            r"set output_dir to a new folder to keep them, or replace them with --overwrite$"):
        train(make_recipe(train__max_steps=2, optimizer__lr=5e-4))
    assert adapter.read_bytes() == made
    monkeypatch.undo()
    replaced = train(make_recipe(train__max_steps=2, optimizer__lr=5e-4), overwrite=True)
    assert adapter.read_bytes() != made and replaced.final_step == 2


@pytest.mark.parametrize("output", ["controlnet", "unet", "pipeline"])
def test_each_methods_outputs_count_as_an_earlier_run(tmp_path, output):
    (tmp_path / output).mkdir()
    with pytest.raises(FinetuneError, match=rf"holds the outputs of an earlier run \({output}\)"):
        guard_earlier_run(tmp_path, None, overwrite=False)
    guard_earlier_run(tmp_path, None, overwrite=True)


def test_a_run_killed_before_its_first_checkpoint_may_start_again(tmp_path):
    for folder in ("logs", "samples"):  # what it leaves: no checkpoint, no output
        (tmp_path / folder).mkdir()
    (tmp_path / "recipe_as_run.yaml").write_text("method: lora\n")
    guard_earlier_run(tmp_path, None, overwrite=False)


def test_overwrite_removes_the_earlier_runs_outputs_before_the_new_run_trains(make_recipe):
    """--overwrite removed the earlier run's checkpoints, samples and logs but left its LoRA file until the new run's end:
    a new run stopped (Ctrl-C) or failed before then left the earlier LoRA beside its own checkpoints, which `finetune
    sample --lora` and the demo took for this run's, and a stop before its first checkpoint said "the run's outputs are in ..."."""
    earlier = train(make_recipe(train__max_steps=2))
    adapter = earlier.output_dir / LORA_WEIGHTS_NAME
    there_while_training = []
    train(make_recipe(train__max_steps=1, optimizer__lr=5e-4), overwrite=True, on_step=lambda step: there_while_training.append(adapter.exists()))
    assert there_while_training == [False] and adapter.is_file()  # gone once the new run trains; the new run's at its end


def test_overwrite_keeps_an_earlier_output_the_new_run_starts_from(make_recipe):
    """lora.init_from naming the earlier run's folder (continue its LoRA as a new run): that LoRA is read, so it stays."""
    earlier = train(make_recipe(train__max_steps=2))
    adapter = earlier.output_dir / LORA_WEIGHTS_NAME
    there_while_training = []
    train(make_recipe(train__max_steps=1, lora__init_from=str(earlier.output_dir)), overwrite=True,
          on_step=lambda step: there_while_training.append(adapter.exists()))  # fmt: skip
    assert there_while_training == [True]


def test_an_output_the_run_starts_from_is_known_by_its_resolved_path(tmp_path):
    from finetune.checkpoints.earlier_run import _read_by_the_run

    run = tmp_path / "run"
    (run / "pipeline").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    assert _read_by_the_run(run, run / "pipeline", (str(tmp_path / "elsewhere" / ".." / "run" / "pipeline"),))
    assert not _read_by_the_run(run, run / "pipeline", (str(tmp_path / "elsewhere"), None, "hub-user/some-model"))
