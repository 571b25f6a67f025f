"""Sampling in batches (finetune.sampling.generate): each image is the one its prompt and seed make alone."""

import numpy as np
import pytest

import finetune.sampling as sampling
from finetune.config import ModelConfig
from finetune.models import load_base_model
from finetune.sampling import build_pipeline, generate

LONG = ", ".join(["red circle", "blue square", "green triangle"] * 14)  # over 75 tokens: read in two chunks


class CountedPipeline:
    """The pipeline, counting its calls and the images each one makes."""

    def __init__(self, pipeline):
        self.pipeline, self.batch_sizes = pipeline, []

    def __getattr__(self, name):
        return getattr(self.pipeline, name)

    def __call__(self, **kwargs):
        result = self.pipeline(**kwargs)
        self.batch_sizes.append(len(result.images))
        return result


@pytest.fixture(scope="module")
def pipeline(tiny_model):
    return build_pipeline(load_base_model(ModelConfig(pretrained=str(tiny_model))))


def test_a_batch_draws_what_each_prompt_and_seed_draw_alone(pipeline, monkeypatch):
    prompts, seeds, negatives = ["a red circle", LONG, "a blue square"], [3, 10, 3], ["blurry", None, "dark"]
    counted = CountedPipeline(pipeline)
    monkeypatch.setattr(sampling, "PIXELS_PER_CALL", 3 * 64 * 64)  # three 64 px images a call
    batched = generate(counted, prompts, 2, seeds, 3, 7.5, 64, negatives)
    # The long prompt's two images are a batch of their own (two chunks), the short prompts' four two batches.
    assert sorted(counted.batch_sizes) == [1, 2, 3]
    for p, row in enumerate(batched):
        assert len(row) == 2
        for k, image in enumerate(row):
            alone = generate(pipeline, [prompts[p]], 1, seeds[p] + k, 3, 7.5, 64, negatives[p])[0][0]
            difference = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(alone, dtype=np.int16))
            assert difference.max() <= 1, (p, k, difference.max())  # float rounding of a batch, at most one level
    first, second = (np.asarray(image, dtype=np.int16) for image in batched[0])
    assert np.abs(first - second).mean() > 1  # seeds 3 and 4: two images
    same_seed = np.asarray(batched[2][0], dtype=np.int16)  # prompt 2 starts at seed 3 too: another prompt, another image
    assert np.abs(first - same_seed).mean() > 1
