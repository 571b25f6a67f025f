"""Validation's grid shared out between processes (finetune.sampling.pipelines.shared_between, finetune.training.validation): every image
is drawn by exactly one process, in the batch one process would draw it in, and the main process puts each in its place.
tests/test_distributed.py draws a grid with two processes and compares it with one process's, pixel for pixel."""

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.sampling.pipelines import generate_with_settings, shared_between
import finetune.sampling.pipelines as sampling
from finetune.sampling.prompt_options import PromptSettings
from finetune.training.validation import merged_rows


class WordTokenizer:
    model_max_length = 77

    def __call__(self, texts, **kwargs):
        return {"input_ids": [[0] * (len(text.split()) + 2) for text in texts]}


class RecordingPipeline:
    """Draws each image as one pixel naming its prompt and seed, and records the batches it was called with."""

    def __init__(self, prompts: list[str]):
        from diffusers.image_processor import VaeImageProcessor

        self.prompts, self.tokenizer, self.components, self.batches = prompts, WordTokenizer(), {}, []
        self.image_processor = VaeImageProcessor()

    def __call__(self, prompt, negative_prompt, generator, output_type, **kwargs):
        made = [(self.prompts.index(text), g.initial_seed()) for text, g in zip(prompt, generator)]
        self.batches.append(made)
        assert output_type == "pt"  # decoded values in [0, 1], checked for NaN before they become pixels
        return SimpleNamespace(images=torch.tensor([[[[p / 255]], [[seed % 256 / 255]], [[0.0]]] for p, seed in made]))


# Three groups (steps and guidance: one `generate` each) of 22, 11 and 11 images: seven batches of up to eight at 256 px.
PROMPTS = [PromptSettings("a red circle", None, 10, 7.5, 2), PromptSettings("a yellow star", None, 20, 7.5, 4),
           PromptSettings("a blue square", None, 30, 3.0, 2), PromptSettings("a green triangle", None, 40, 7.5, 2)]  # fmt: skip


def draw(pipeline, share: tuple[int, int] | None) -> tuple[list[list], set[int]]:
    """The rows `generate_with_settings` returns at 256 px, and the ids the share drew."""
    if share is None:
        return generate_with_settings(pipeline, PROMPTS, 11, 256), set()
    with shared_between(*share) as dealt:
        return generate_with_settings(pipeline, PROMPTS, 11, 256), dealt.drawn


@pytest.mark.parametrize("processes", [2, 3, 7])  # 7: a batch each
def test_every_image_is_drawn_by_one_process_in_the_batch_one_process_draws_it_in(processes):
    alone = RecordingPipeline([p.prompt for p in PROMPTS])
    draw(alone, None)
    drawn_by = {}
    batches = []
    for index in range(processes):
        pipeline = RecordingPipeline(alone.prompts)
        rows, ids = draw(pipeline, (index, processes))
        mine = {(r, c) for r, row in enumerate(rows) for c, image in enumerate(row) if image is not None}
        assert mine, f"process {index} of {processes} drew nothing"
        assert ids == {id(rows[r][c]) for r, c in mine}  # what the gather sends
        for cell in mine:
            assert cell not in drawn_by, f"{cell} drawn by processes {drawn_by[cell]} and {index}"
            drawn_by[cell] = index
            r, c = cell
            assert rows[r][c].getpixel((0, 0))[:2] == (r, (PROMPTS[r].seed + c) % 256)  # its own prompt and seed
        batches += pipeline.batches
    assert set(drawn_by) == {(r, c) for r in range(len(PROMPTS)) for c in range(11)}
    assert sorted(batches) == sorted(alone.batches)  # the same batches: the same pixels, to the last bit


def test_a_process_that_halved_its_batches_alone_still_draws_its_own_share(monkeypatch):
    """After running out of GPU memory one process makes smaller batches (sampling.PIXELS_PER_CALL): the batches dealt
    out are still those every process counts."""
    shares = []
    for index, pixels_per_call in enumerate([256 * 256, sampling.PIXELS_PER_CALL]):
        monkeypatch.setattr(sampling, "PIXELS_PER_CALL", pixels_per_call)
        rows, _ = draw(RecordingPipeline([p.prompt for p in PROMPTS]), (index, 2))
        shares.append({(r, c) for r, row in enumerate(rows) for c, image in enumerate(row) if image is not None})
    assert not shares[0] & shares[1] and len(shares[0] | shares[1]) == len(PROMPTS) * 11


def test_the_main_process_puts_each_gathered_image_in_its_place():
    mine, condition = Image.new("RGB", (2, 2), "red"), Image.new("RGB", (2, 2), "white")
    theirs = np.full((2, 2, 3), 7, dtype=np.uint8)
    merged = merged_rows([[condition, mine, None]], [{(0, 1): np.asarray(mine)}, {(0, 2): theirs}])
    assert merged[0][:2] == [condition, mine] and np.array_equal(np.asarray(merged[0][2]), theirs)
    with pytest.raises(RuntimeError, match=r"\(0, 2\)"):
        merged_rows([[condition, mine, None]], [{}, {}])


def test_sampling_outside_a_share_draws_every_image():
    rows, _ = draw(RecordingPipeline([p.prompt for p in PROMPTS]), None)
    assert [len(row) for row in rows] == [11] * len(PROMPTS)  # rows left empty would pass a check of each image alone
    assert all(image.getpixel((0, 0))[:2] == (r, (PROMPTS[r].seed + c) % 256) for r, row in enumerate(rows) for c, image in enumerate(row))


class SteppingPipeline(RecordingPipeline):
    """RecordingPipeline, ending each denoising step as diffusers does (its callback), for a bar to count."""

    def __call__(self, num_inference_steps, callback_on_step_end=None, **kwargs):
        for step in range(num_inference_steps):
            if callback_on_step_end is not None:
                callback_on_step_end(self, step, step, {})
        return super().__call__(**kwargs)


@pytest.mark.parametrize("share", [None, (0, 3), (2, 3)])
def test_the_grid_has_one_bar_of_the_steps_this_process_draws_and_only_where_shown(share, monkeypatch):
    """The validation grid drew for 6-30 s with no bar (finetune.training.validation opens `grid_progress`). A shared grid's
    bar counts this process's share (its total known as its batches are dealt); a process not shown (not the main) draws none."""
    bars = []
    opened = sampling.denoising_bar

    @contextlib.contextmanager
    def kept(pipeline, what, total):
        with opened(pipeline, what, total) as bar:
            bars.append(bar)
            yield bar

    monkeypatch.setattr(sampling, "denoising_bar", kept)
    pipeline = SteppingPipeline([p.prompt for p in PROMPTS])
    with sampling.grid_progress("validation grid (step 5)", shown=True):
        draw(pipeline, share)
    steps = {p.prompt: p.num_inference_steps for p in PROMPTS}
    drawn_steps = sum(steps[pipeline.prompts[p]] for batch in pipeline.batches for p, _ in batch)
    assert [(bar.desc, bar.total, bar.n) for bar in bars] == [("validation grid (step 5)", drawn_steps, drawn_steps)]
    if share is None:
        assert drawn_steps == sampling.denoising_steps(PROMPTS, 11)
    with sampling.grid_progress("validation grid (step 5)", shown=False):
        draw(SteppingPipeline(pipeline.prompts), share)
    assert len(bars) == 1  # none more
