"""A micro-batch's noise and timesteps are keyed by its number in the whole run (finetune.training.draw_keys): a resume with
other gradient accumulation goes on from the micro-batches drawn before its checkpoint, never drawing their noise again."""

import json

import pytest

from finetune.checkpoints.run_files import STATE_FILE
from finetune.errors import FinetuneError
from finetune.training.diffusion import BatchRandomness
from finetune.training.draw_keys import DRAWN
import finetune.training.trainer as trainer
import finetune.training.training_run as training_run


@pytest.fixture
def keys(monkeypatch):
    """The micro-batch key of each BatchRandomness the trainer makes, in order."""
    seen = []

    def recorded(seed, micro_batch, *rest):
        seen.append(micro_batch)
        return BatchRandomness(seed, micro_batch, *rest)

    monkeypatch.setattr(training_run, "BatchRandomness", recorded)
    return seen


def run(make_recipe, tmp_path, name, accumulation, max_steps, resume=None):
    recipe = make_recipe(output_dir=str(tmp_path / name), train__batch_size=1, train__gradient_accumulation_steps=accumulation,
                         train__max_steps=max_steps)  # fmt: skip
    return trainer.train(recipe, resume=resume).output_dir / "checkpoints" / f"checkpoint-{max_steps}"


def test_a_resume_with_other_accumulation_never_draws_a_key_drawn_before_its_checkpoint(make_recipe, tmp_path, keys):
    first = run(make_recipe, tmp_path, "first", 4, 2)
    drawn = list(keys)
    assert drawn == list(range(8))
    keys.clear()  # at 2 a step from step 2: the numbering of this run alone would start again at 4
    second = run(make_recipe, tmp_path, "second", 2, 4, resume=str(first))
    assert not set(keys) & set(drawn) and keys == list(range(8, 12))
    assert json.loads((second / STATE_FILE).read_text())[DRAWN] == 12
    keys.clear()  # a third accumulation: from the 12 drawn in all (the recipe's accumulation and step alone would say 8)
    run(make_recipe, tmp_path, "third", 1, 6, resume=str(second))
    assert keys == [12, 13]

    keys.clear()  # at the same accumulation: the keys of the run never stopped
    run(make_recipe, tmp_path, "same", 4, 3, resume=str(first))
    assert keys == list(range(8, 12))


def test_a_resume_with_other_accumulation_steps_the_optimizer_after_each_steps_last_micro_batch(make_recipe, tmp_path, monkeypatch):
    """accelerate's load_state restores its count of micro-batches, by which it tells the last of a step (count % accumulation):
    at 2 a step, checkpoint-1 counts 2, and resumed at 3 a step the optimizer stepped after the first micro-batch, then
    after the first of the next step (with the two before it), and the last two never trained."""
    from accelerate import Accelerator

    syncs, original = [], Accelerator.backward
    monkeypatch.setattr(Accelerator, "backward", lambda self, loss, **kw: syncs.append(self.sync_gradients) or original(self, loss, **kw))
    first = run(make_recipe, tmp_path, "first", 2, 1)
    assert syncs == [False, True]
    syncs.clear()
    run(make_recipe, tmp_path, "second", 3, 3, resume=str(first))
    assert syncs == [False, False, True] * 2


def test_a_checkpoint_without_the_record_keeps_the_numbering_it_had(make_recipe, tmp_path, keys):
    first = run(make_recipe, tmp_path, "first", 4, 1)
    state = json.loads((first / STATE_FILE).read_text())
    (first / STATE_FILE).write_text(json.dumps({key: value for key, value in state.items() if key != DRAWN}))
    keys.clear()
    run(make_recipe, tmp_path, "second", 2, 2, resume=str(first))
    assert keys == [2, 3]  # step 1 at this run's 2 a step, as before checkpoints kept the count


def test_a_record_that_is_not_a_count_is_one_line_before_the_model_loads(make_recipe, tmp_path, monkeypatch):
    first = run(make_recipe, tmp_path, "first", 1, 1)
    state = json.loads((first / STATE_FILE).read_text())
    monkeypatch.setattr(trainer, "load_base_model", lambda *a, **k: pytest.fail("loaded the model"))
    for wrong in ("8", -1, None, 2.5):
        (first / STATE_FILE).write_text(json.dumps({**state, DRAWN: wrong}))
        with pytest.raises(FinetuneError, match=rf"checkpoint {first}: its {DRAWN} \(.*\) is not a count of micro-batches .*resume from another checkpoint"):
            run(make_recipe, tmp_path, "second", 1, 2, resume=str(first))
