"""Sampling in batches (finetune.sampling.pipelines.generate): each image is the one its prompt and seed make alone."""

import numpy as np
import pytest
import torch

from finetune.config import ModelConfig
from finetune.models.loading import load_base_model
from finetune.sampling.pipelines import build_pipeline, generate
import finetune.sampling.pipelines as sampling

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


class SmallGpuPipeline(CountedPipeline):
    """The pipeline on a GPU that holds at most `fits` images at once: more raise its out-of-memory error."""

    def __init__(self, pipeline, fits):
        super().__init__(pipeline)
        self.fits, self.tried = fits, []

    def __call__(self, **kwargs):
        self.tried.append(len(kwargs["generator"]))
        if len(kwargs["generator"]) > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().__call__(**kwargs)


def test_a_batch_out_of_gpu_memory_is_made_in_halves_and_later_calls_stay_small(pipeline, monkeypatch, capsys):
    prompts = ["a red circle", "a blue square", "a green triangle"]
    alone = generate(pipeline, prompts, 2, 5, 3, 7.5, 64)
    monkeypatch.setattr(sampling, "PIXELS_PER_CALL", 6 * 64 * 64)  # all six images in one call
    small_gpu = SmallGpuPipeline(pipeline, fits=2)
    made = generate(small_gpu, prompts, 2, 5, 3, 7.5, 64)
    assert small_gpu.tried == [6, 3, 1, 1, 1, 1, 1, 1]  # six fail, three fail, then one at a time
    assert small_gpu.batch_sizes == [1] * 6
    assert "6 images at once ran out of GPU memory; making 3 at a time" in capsys.readouterr().out
    for row, row_alone in zip(made, alone):
        for image, image_alone in zip(row, row_alone):
            assert np.abs(np.asarray(image, dtype=np.int16) - np.asarray(image_alone, dtype=np.int16)).max() <= 1
    assert sampling.PIXELS_PER_CALL == 64 * 64  # kept for the next validation, which starts at one image
    small_gpu.tried.clear()
    generate(small_gpu, prompts[:1], 2, 5, 3, 7.5, 64)
    assert small_gpu.tried == [1, 1]

    with pytest.raises(torch.OutOfMemoryError):  # one image that does not fit: nothing smaller to try
        generate(SmallGpuPipeline(pipeline, fits=0), prompts[:1], 1, 5, 3, 7.5, 64)


def test_processes_sampling_in_lockstep_do_not_halve_alone(pipeline, monkeypatch):
    """Under ZeRO-3 every process samples validation together (each forward gathers weights from all): one that
    remade its batch in halves would leave the others waiting, so out of memory stops the run there."""
    monkeypatch.setattr(sampling, "PIXELS_PER_CALL", 2 * 64 * 64)
    small_gpu = SmallGpuPipeline(pipeline, fits=1)
    with sampling.in_lockstep(), pytest.raises(torch.OutOfMemoryError):
        generate(small_gpu, ["a red circle"], 2, 5, 2, 7.5, 64)
    assert small_gpu.tried == [2] and sampling.PIXELS_PER_CALL == 2 * 64 * 64
    generate(small_gpu, ["a red circle"], 2, 5, 2, 7.5, 64)  # outside it, halving again
    assert small_gpu.tried == [2, 2, 1, 1]


class OutOfMemoryAfterAStep(CountedPipeline):
    """The pipeline on a GPU that holds one image: a call of more runs one denoising step, then raises."""

    def __call__(self, **kwargs):
        if len(kwargs["generator"]) == 1:
            return super().__call__(**kwargs)
        step_done = kwargs["callback_on_step_end"]

        def fail_after_the_step(pipe, step, timestep, values):
            step_done(pipe, step, timestep, values)
            raise torch.OutOfMemoryError("CUDA out of memory")

        return self.pipeline(**{**kwargs, "callback_on_step_end": fail_after_the_step})


def test_one_bar_counts_the_steps_of_every_call_and_a_batch_remade_in_halves_once(pipeline, monkeypatch):
    monkeypatch.setattr(sampling, "PIXELS_PER_CALL", 2 * 64 * 64)
    small_gpu = OutOfMemoryAfterAStep(pipeline)
    with sampling.denoising_bar(small_gpu, "sampling", 2 * 3 + 2) as bar:
        generate(small_gpu, ["a red circle"], 2, 5, 3, 7.5, 64)
        generate(small_gpu, ["a blue square"], 1, 5, 2, 7.5, 64)  # a second call (as prompts of other steps are) on the same bar
        assert bar.n == 2 * 3 + 2  # the failed call's step (2 images) taken back
    assert not hasattr(small_gpu, "finetune_denoising_bar")  # later calls (training's grids) draw no bar
