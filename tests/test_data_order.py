"""A resumed run continues the data order where its checkpoint stopped (finetune.data.order): at the same global batch
the very batches of a run never stopped (accumulation changed or not), at another (processes, train.batch_size) the
rest of the epoch's shuffle, each image once, before the next epoch's."""

import json
from itertools import islice

import pytest

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
from finetune.checkpoints.run_files import STATE_FILE
from finetune.data.batches import EpochBatchSampler, ItemLayout, make_batch_sampler
from finetune.data.buckets import BucketBatchSampler, split_rows
from finetune.data.order import MAX_EPOCH, OutsideTheData
from finetune.errors import FinetuneError
from finetune.formats.kohya import load_lora
from finetune.training.trainer import train
import finetune.training.trainer as trainer


def global_batches(samplers, start, count):
    """`count` micro-batches from `start`: each the processes' rows together, as (indices, epochs)."""
    streams = [islice(iter(sampler), count) for sampler in samplers]
    batches = []
    for rows in zip(*streams):
        joined = [pair for row in rows for pair in row]
        batches.append(([index for index, _ in joined], {epoch for _, epoch in joined}))
    assert len(batches) == count and all(samplers[0].global_batch_indices(start + i) == batch for i, (batch, _) in enumerate(batches))
    return batches


def ranks(kind, layout, batch_size, processes, seed, start=0, resumed_at=None):
    return [kind(layout, batch_size, processes, rank, seed, start=start, resumed_at=resumed_at) for rank in range(processes)]


def test_a_resume_with_another_global_batch_trains_the_rest_of_the_epochs_permutation_then_the_next_epoch():
    before = EpochBatchSampler(12, batch_size=2, num_processes=1, process_index=0, seed=4)  # 6 batches an epoch
    trained = global_batches([before], 0, 8)  # all of epoch 0, two batches of epoch 1
    position = before.position_after(8)
    # Resumed by 2 processes of batch 2 at step 4 (say): this run's micro-batches count from 4.
    after = ranks(EpochBatchSampler, 12, 2, 2, seed=4, start=4, resumed_at=position)
    resumed = global_batches(after, 4, 4)
    epoch_one = [index for batch, _ in trained[6:] + resumed[:2] for index in batch]
    assert epoch_one == before.permutation(1)  # the epoch's permutation continued: each image once, none skipped
    assert [epochs for _, epochs in trained[6:] + resumed] == [{1}] * 4 + [{2}] * 2
    fresh = EpochBatchSampler(12, batch_size=4, num_processes=1, process_index=0, seed=4)
    assert [batch for batch, _ in resumed[2:]] == fresh.epoch_batches(2)[:2]  # epoch 2 as a run of global batch 4 deals it

    # Stopped again inside that epoch and resumed at a third global batch: the epoch's first two deals are replayed.
    third = EpochBatchSampler(12, batch_size=2, num_processes=1, process_index=0, seed=4, start=0, resumed_at=after[0].position_after(5))
    rest = global_batches([third], 0, 2)
    assert [index for batch, _ in trained[6:] + resumed[:1] + rest for index in batch] == before.permutation(1)


def test_an_epoch_left_with_fewer_images_than_the_new_global_batch_ends_there():
    before = EpochBatchSampler(10, batch_size=4, num_processes=1, process_index=0, seed=2)  # 2 batches, 2 images left out
    after = EpochBatchSampler(10, batch_size=3, num_processes=1, process_index=0, seed=2, start=1, resumed_at=before.position_after(1))
    resumed = global_batches([after], 1, 3)
    # The 6 images after the first 4 (the two the first deal left out among them), then epoch 1: nothing twice.
    assert [batch for batch, _ in resumed[:2]] == [before.permutation(0)[4:7], before.permutation(0)[7:10]]
    assert resumed[2] == (before.permutation(1)[:3], {1})
    after = EpochBatchSampler(10, batch_size=4, num_processes=1, process_index=0, seed=2, start=2, resumed_at=before.position_after(1))
    assert global_batches([after], 2, 1)[0] == (before.permutation(0)[4:8], {0})  # unchanged: the batch a run never stopped trains


def test_a_resume_at_the_same_global_batch_is_the_run_never_stopped():
    layout = [(80, 48)] * 7 + [(64, 64)] * 5 + [(48, 80)] * 2
    for kind, items in ((EpochBatchSampler, 12), (BucketBatchSampler, layout)):
        straight = global_batches(ranks(kind, items, 2, 2, seed=6), 0, 12)
        stopped = ranks(kind, items, 2, 2, seed=6)[0]
        for at in (0, 3, 5, 9):  # an epoch's start and inside it
            resumed = ranks(kind, items, 2, 2, seed=6, start=at, resumed_at=stopped.position_after(at))
            assert global_batches(resumed, at, 12 - at) == straight[at:], (kind.__name__, at)
        # A checkpoint from before positions were kept, or of another order (another seed): from `start`, as before.
        for resumed_at in (None, ranks(kind, items, 2, 2, seed=7)[0].position_after(5)):
            assert global_batches(ranks(kind, items, 2, 2, seed=6, start=5, resumed_at=resumed_at), 5, 7) == straight[5:]


def test_a_resume_at_the_same_global_batch_on_another_number_of_processes_continues_the_deal():
    """2 processes of batch 2 resumed by 1 of batch 4 (or the other way): the batches the new run would have dealt, not
    the epoch's rest dealt again in another order; a deal differs by its processes only in a padded single-image batch."""
    layout = [(80, 48)] * 7 + [(64, 64)] * 5 + [(48, 80)] * 1
    for kind, items in ((EpochBatchSampler, 12), (BucketBatchSampler, layout)):
        for (batch_then, processes_then), (batch_now, processes_now) in (((2, 2), (4, 1)), ((4, 1), (2, 2)), ((1, 4), (2, 2))):
            stopped = ranks(kind, items, batch_then, processes_then, seed=6)[0]
            straight = global_batches(ranks(kind, items, batch_now, processes_now, seed=6), 0, 12)
            for at in (2, 3, 7):  # inside the first epoch, then at or past the second's start (3 or 5 batches an epoch)
                resumed = ranks(kind, items, batch_now, processes_now, seed=6, start=at, resumed_at=stopped.position_after(at))
                assert global_batches(resumed, at, 12 - at) == straight[at:], (kind.__name__, processes_then, processes_now, at)


def test_buckets_resumed_with_another_global_batch_deal_each_bucket_s_untrained_images_once():
    layout = [(80, 48)] * 7 + [(64, 64)] * 5 + [(48, 80)] * 2
    before = BucketBatchSampler(layout, batch_size=3, num_processes=1, process_index=0, seed=1)
    trained = global_batches([before], 0, before.batches_per_epoch + 2)  # epoch 0, then two batches of epoch 1
    epoch_one = [index for batch, _ in trained[before.batches_per_epoch :] for index in batch]
    # Resumed by 2 processes of batch 2: batches of up to 4, a bucket's last smaller (a single image borrows a second).
    after = ranks(BucketBatchSampler, layout, 2, 2, seed=1, start=0, resumed_at=before.position_after(len(trained)))
    stream = global_batches(after, 0, 20)
    resumed = [batch for batch, epochs in stream if epochs == {1}]
    assert stream[: len(resumed)] == [(batch, {1}) for batch in resumed]  # the rest of epoch 1 first
    for batch in resumed:
        assert len({layout[index] for index in batch}) == 1 and 2 <= len(batch) <= 4  # one bucket, the new global batch
    # Each process's rows, as the trainer weighs them: of the resumed batches, whose sizes differ.
    assert [after[1].rows_of(m) for m in range(len(resumed))] == [(len(batch), split_rows(len(batch), 2, 1)) for batch in resumed]
    assert len({len(batch) for batch in resumed}) > 1
    dealt = [index for batch in resumed for index in batch]
    assert not set(epoch_one) & set(dealt) and sorted(epoch_one + sorted(set(dealt))) == list(range(len(layout)))  # each once, none skipped
    assert len(dealt) - len(set(dealt)) <= len(set(layout))  # but a bucket's last single image, whose batch borrows one
    fresh = BucketBatchSampler(layout, batch_size=2, num_processes=2, process_index=0, seed=1)
    rest = [batch for batch, _ in stream[len(resumed) : len(resumed) + fresh.batches_per_epoch]]
    assert rest == fresh.epoch_batches(2)  # then epoch 2, as a run of 2 processes deals it


def record_indices(monkeypatch):
    """Each micro-batch's dataset indices, as the LoRA loss receives them."""
    from finetune.methods.lora import LoRAMethod

    seen, original = [], LoRAMethod.loss

    def loss(self, modules, batch, randomness):
        seen.append(batch["indices"].tolist())
        return original(self, modules, batch, randomness)

    monkeypatch.setattr(LoRAMethod, "loss", loss)
    return seen


def test_a_run_resumed_with_another_batch_size_or_accumulation_trains_the_images_that_come_next(make_recipe, tmp_path, monkeypatch):
    seen = record_indices(monkeypatch)
    straight = train(make_recipe(output_dir=str(tmp_path / "straight"), train__batch_size=1, train__max_steps=6, checkpoint__every_n_steps=1,
                           checkpoint__keep_last=6))
    order = list(seen)  # 4 images: epoch 0's four, then epoch 1's first two
    assert sorted(i for [i] in order[:4]) == [0, 1, 2, 3]
    checkpoints = straight.output_dir / "checkpoints"

    seen.clear()  # one image trained; at batch 2 the next two, then (one left: not a batch) epoch 1's first two
    train(make_recipe(output_dir=str(tmp_path / "batch"), train__batch_size=2, train__max_steps=3), resume=str(checkpoints / "checkpoint-1"))
    assert seen == [order[1] + order[2], order[4] + order[5]]

    seen.clear()  # two images trained; a step of 2 micro-batches takes the last two of epoch 0
    train(make_recipe(output_dir=str(tmp_path / "accumulation"), train__batch_size=1, train__gradient_accumulation_steps=2, train__max_steps=3),
          resume=str(checkpoints / "checkpoint-2"))  # fmt: skip
    assert seen == [order[2], order[3]]


def test_a_run_of_epochs_resumed_with_another_batch_size_ends_with_the_epochs_last_images(make_recipe, tmp_path, monkeypatch):
    seen = record_indices(monkeypatch)
    first = train(make_recipe(train__batch_size=1, train__max_steps=1))  # 1 image of 4: a quarter of epoch 1
    trained = list(seen)
    seen.clear()  # at batch 2: the 3 images left make 1 batch (the last waits for the next shuffle), the end of epoch 1
    resumed = train(make_recipe(train__batch_size=2, train__max_steps=None, train__max_epochs=1), resume="latest")
    assert resumed.final_step == 2 and len(seen) == 1 and not set(seen[0]) & set(trained[0]), seen
    assert load_lora(first.output_dir / LORA_WEIGHTS_NAME).metadata["finetune.epoch"] == "1"


def test_a_run_deals_each_epoch_once_at_its_start_also_resumed_at_another_batch(make_recipe, monkeypatch):
    """Its epochs were counted from deals of their own (a sampler per batch, another at the checkpoint's position), then the
    trainer's sampler dealt the same again: start-up work on the whole dataset, twice to six times."""
    seen, deal = [], EpochBatchSampler.deal
    monkeypatch.setattr(EpochBatchSampler, "deal", lambda self, epoch, *rest: seen.append(epoch) or deal(self, epoch, *rest))
    train(make_recipe(train__batch_size=1, train__max_steps=1))  # 4 images: a quarter of epoch 0
    assert seen == [0]
    seen.clear()  # at batch 2: the checkpoint's deal (to know the image it trained), the 3 left's (1 batch), then epoch 1's
    train(make_recipe(train__batch_size=2, train__max_steps=3), resume="latest")
    assert seen == [0, 0, 1]


def test_a_layouts_order_key_is_the_key_of_the_sampler_made_of_it():
    """The resume line says the data continue only where the sampler will take the checkpoint's position up: the
    trainer tells that from the layout, before the sampler exists."""
    for bucket_of in (None, [(64, 64), (64, 32), (64, 64), (32, 64)]):
        layout = ItemLayout(bucket_of, 4)
        assert make_batch_sampler(layout, 1, 1, 0, seed=3).order_key() == layout.order_key(3) != layout.order_key(4)


def test_a_hand_edited_position_is_one_line_naming_the_checkpoint_before_the_model_loads(make_recipe, monkeypatch):
    checkpoint = train(make_recipe(train__batch_size=1, train__max_steps=1)).output_dir / "checkpoints" / "checkpoint-1"
    state = json.loads((checkpoint / STATE_FILE).read_text())
    position = state["data_order"]
    monkeypatch.setattr(trainer, "load_base_model", lambda *a, **k: pytest.fail("loaded the model"))
    absurd = ({**position, "epoch": 10**30}, {**position, "epoch": MAX_EPOCH + 1}, {**position, "dealt": [[2, 3, 1]]},  # (3 processes of 2 rows)
              {**position, "dealt": [[1, 1, 10**9]]}, {**position, "dealt": [[1, 1, 1]] * 5}, {**position, "dealt": [[2, 1, 1], [1, 1, 3]]},
              {**position, "dealt": [[2, 1, 0]] * 10 + [[1, 1, 1]]})  # fmt: skip
    # (a traceback from torch's seeding, or a run from epoch 10**12 or from batches the 4 images cannot have made, until now)
    for wrong in ([position["epoch"], position["dealt"]], {**position, "dealt": []}, {**position, "dealt": [[1, 1]]},
                  {**position, "epoch": "0"}, {k: v for k, v in position.items() if k != "epoch"}, {**position, "dealt": [[0, 1, 1]]}, *absurd):  # fmt: skip
        (checkpoint / STATE_FILE).write_text(json.dumps({**state, "data_order": wrong}))
        with pytest.raises(FinetuneError, match=rf"^checkpoint {checkpoint}: its data_order \(.*\) is not a position in the data order .*: "
                                                r"resume from another checkpoint, or delete data_order from its trainer_state.json"):  # fmt: skip
            train(make_recipe(train__batch_size=2, train__max_steps=2), resume="latest")


def test_a_position_of_more_processes_or_batches_than_the_data_has_is_refused_before_any_deal():
    """[global batch, processes, batches] past the images: a bucket's deal padded its last batch to 10**12 processes until
    memory ran out; each batch of an epoch's deals has an image not trained before it."""
    layout = [(80, 48)] * 3 + [(64, 64)] * 2
    key = BucketBatchSampler(layout, 1, 1, 0, seed=1).order_key()
    # 5 images: 10**6 processes, 6 batches, or 3 after 2 batches of 2 (of 3 and 2 images: 1 or 2 images left)
    for dealt in ([[10**6, 10**6, 1]], [[2, 1, 2], [1, 1, 4]], [[2, 1, 2], [1, 1, 3]], [[2, 1, 2], [3, 1, 3]]):
        with pytest.raises(OutsideTheData):
            BucketBatchSampler(layout, 1, 1, 0, seed=1, start=3, resumed_at={"order": key, "epoch": 0, "dealt": dealt})
    assert BucketBatchSampler(layout, 1, 1, 0, seed=1, start=3, resumed_at={"order": key, "epoch": 0, "dealt": [[2, 1, 2], [1, 1, 1]]}).continued


@pytest.mark.parametrize("bucketed", [False, True], ids=["square", "buckets"])
def test_a_stream_deals_each_epoch_once_as_the_loop_reads_it(monkeypatch, bucketed):
    """Every look-up past the first epoch also reads the stream's first epoch's deal: with one deal kept, both were dealt
    again (a shuffle and a pass over every image) a few times a step, for the rest of the run."""
    layout = ItemLayout([(64, 64), (64, 96)] * 4 if bucketed else None, 8)
    sampler = make_batch_sampler(layout, 1, 1, 0, seed=3)
    dealt, deal = [], type(sampler).deal
    monkeypatch.setattr(type(sampler), "deal", lambda self, epoch, *rest: dealt.append(epoch) or deal(self, epoch, *rest))
    batches = iter(sampler)
    for micro_batch in range(24):  # three epochs of 8 batches, read as the trainer reads them
        next(batches)
        sampler.rows_of(micro_batch), sampler.own_images(micro_batch)
    assert dealt == [0, 1, 2]
