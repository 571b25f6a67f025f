"""A bucket's last global batch with fewer images than processes borrows images of its bucket, so that every process has a
row (finetune.data.buckets): the borrowed rows weigh nothing in the step, so N processes train what one process does with the same
global batch (finetune.training.step_losses.micro_batch_shares)."""

from collections import Counter

import pytest
from test_distributed import BORROWING, TALL, WIDE, assert_one_process_trains_what_two_did, borrowing_run, deepspeed, launch, mixed_folder, wait, write

from finetune.data.buckets import BucketBatchSampler
from finetune.data.order import PaddedBatch
from finetune.training.step_losses import micro_batch_shares


def test_a_borrowed_row_weighs_nothing_and_every_own_image_of_a_step_weighs_alike():
    # 3 wide images and 1 tall one, a row each on 2 processes: [wide, wide], [wide + a borrowed one], [tall + itself borrowed].
    bucket_of = [WIDE] * 3 + [TALL]
    ranks = [BucketBatchSampler(bucket_of, 1, 2, rank, seed=5) for rank in range(2)]
    batches = ranks[0].epoch_batches(0)
    assert sorted(len(batch) for batch in batches) == [2, 2, 2]
    assert sorted(batch.own for batch in batches if isinstance(batch, PaddedBatch)) == [1, 1]
    assert [ranks[0].own_images(m) for m in range(3)] == [batch.own if isinstance(batch, PaddedBatch) else 2 for batch in batches]
    # One step of the epoch's 3 micro-batches (accumulation 3): an image's weight in the averaged gradient is its process's
    # factor over (rows of its mean x processes x micro-batches): each of the 4 images 1/4, as in one batch of all of them.
    shares = [micro_batch_shares(sampler, range(3), 2) for sampler in ranks]
    weights = Counter()
    for rank, sampler in enumerate(ranks):
        for m, batch in enumerate(batches):
            rows = sampler.rows_of(m)[1]
            for index in batch[rows]:
                weights[index] += shares[rank][m] / ((rows.stop - rows.start) * 2 * 3)
    assert weights == {index: 1 / 4 for index in range(4)}
    padded = [m for m, batch in enumerate(batches) if isinstance(batch, PaddedBatch)]
    assert all(shares[1][m] == 0 for m in padded)  # the second row of a padded batch is the borrowed one



def test_a_resume_at_another_global_batch_deals_an_image_that_was_only_borrowed():
    """An image borrowed by a padded batch (its own batch not come yet) was counted as trained: a resume at another global batch
    skipped it for the rest of the epoch. Only a batch's own images are trained."""
    layout = [WIDE] * 3 + [TALL] * 2  # on 2 processes of batch 1, the wide bucket's last batch is one image and a borrowed one
    for seed in range(50):  # a seed whose deal has a padded batch before the own batch of the image it borrows
        batches = BucketBatchSampler(layout, 1, 2, 0, seed=seed).epoch_batches(0)
        padded = next(m for m, batch in enumerate(batches) if isinstance(batch, PaddedBatch))
        borrowed = set(batches[padded][batches[padded].own :])
        if borrowed & set(index for batch in batches[padded + 1 :] for index in batch):
            break
    else:
        pytest.fail("no seed deals a padded batch before its borrowed image's own")
    before = BucketBatchSampler(layout, 1, 2, 0, seed=seed)
    trained = {index for batch in batches[: padded + 1] for index in batch[: getattr(batch, "own", len(batch))]}
    after = BucketBatchSampler(layout, 1, 1, 0, seed=seed, start=padded + 1, resumed_at=before.position_after(padded + 1))
    rest, stream = [], iter(after)
    while (row := next(stream))[0][1] == 0:
        rest += [index for index, _ in row]
    assert sorted(rest) == sorted(set(range(len(layout))) - trained)  # the borrowed-only image too, each once


# Before, a borrowed image trained as much as the batch's own one (its own noise: another gradient) and a lone image weighed
# half: the gradient of such a step was 50-90% off one process's, and the weights ended apart. The DDP launch is one run of
# tests/test_distributed.py's launch (test_two_processes_train_what_one_does_when_a_buckets_last_batch_borrows_images there).
@pytest.mark.slow  # ZeRO-2's launch is slow
def test_under_zero2_two_processes_train_what_one_does_when_a_buckets_last_batch_borrows_images(make_recipe, tmp_path):
    """ZeRO-2 averages the processes' gradients as DDP does (weights measured before: up to 4e-3 apart, now 1e-6)."""
    run = borrowing_run(mixed_folder(tmp_path / "mixed", BORROWING))
    two_processes = make_recipe(output_dir=str(tmp_path / "two"), train__batch_size=1, **run)
    wait(launch(deepspeed("zero2.json"), write(two_processes, tmp_path / "two.yaml")))
    assert_one_process_trains_what_two_did(tmp_path / "two", run, make_recipe, tmp_path)
