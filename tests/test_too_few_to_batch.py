"""The too-few-images-to-batch error names only ways out that exist: with train.batch_size already 1 and the
shortage from the processes (3 processes, 2 images) it told the user to lower train.batch_size."""

import pytest

from finetune.config.recipe_loading import recipe_from_dict
from finetune.data.batches import EpochBatchSampler
from finetune.data.buckets import BucketBatchSampler
from finetune.data.buckets import too_few_to_batch
from finetune.errors import FinetuneError


def recipe(batch_size: int, bucketing: bool = False, loss_images: int = 0):
    data = {"image_dir": "images", "resolution": 64, "bucketing": {"enabled": bucketing, "step": 32}}
    return recipe_from_dict({"method": "lora", "output_dir": "run", "model": {"pretrained": "base"}, "data": data,
                             "train": {"batch_size": batch_size}, "validation": {"loss_images": loss_images}})


@pytest.mark.parametrize(("images", "batch_size", "processes", "bucketing", "ways"), [
    (2, 1, 3, False, "launch at most 2 processes, or add images"),  # batch size 1: no lowering it
    (2, 4, 1, False, "lower train.batch_size to 2, or add images"),  # one process: no fewer
    (4, 2, 3, False, "lower train.batch_size to 1, launch at most 2 processes, or add images"),
    (3, 2, 2, False, "lower train.batch_size to 1, launch one process, or add images"),
    (1, 2, 3, False, "lower train.batch_size and launch fewer processes, or add images"),  # neither alone is enough
    (2, 4, 3, True, "launch at most 2 processes, or add images"),  # bucketing: one image a process, whatever the batch size
])
def test_only_the_ways_that_fill_a_batch_are_named(images, batch_size, processes, bucketing, ways):
    assert too_few_to_batch(images, recipe(batch_size, bucketing), processes).endswith(f"): {ways}")


def test_with_bucketing_the_line_says_one_image_a_process_is_needed():
    # Not "fewer than one batch (train.batch_size 4 x 3 processes)": with buckets 3 images would do
    assert too_few_to_batch(2, recipe(4, bucketing=True), 3) == (
        "2 training images (repeats counted) are fewer than 3 processes (with data.bucketing each process needs one image, "
        "whatever train.batch_size): launch at most 2 processes, or add images")


def test_lowering_validation_loss_images_is_named_only_where_it_would_do():
    assert too_few_to_batch(1, recipe(2, loss_images=3), 1, 4).endswith(
        "(train.batch_size 2): lower validation.loss_images, lower train.batch_size to 1, or add images")
    assert too_few_to_batch(1, recipe(1, loss_images=1), 3, 2).endswith(
        "(train.batch_size 1 x 3 processes): launch one process, or add images")  # 2 images are still fewer than 3


def test_the_samplers_name_the_same_ways():
    with pytest.raises(FinetuneError, match=r"\(1 x 3 processes\): launch at most 2 processes, or add images$"):
        EpochBatchSampler(2, 1, 3, 0, 0)
    with pytest.raises(FinetuneError, match=r"fewer than the 3 processes: launch at most 2 processes, or add images$"):
        BucketBatchSampler([(64, 64), (64, 64)], 1, 3, 0, 0)
