"""DreamBooth's class images made by several processes (each its share): one process's images that decode to NaN stop every
process with the same line, none left waiting for it in a collective. Two processes forked from the test's, joined over gloo."""

from __future__ import annotations

import os
import signal
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers.image_processor import VaeImageProcessor

import finetune.class_images as class_images
from finetune.class_images import generate_class_images, generate_on_every_process
from finetune.config import ClassImageGeneration
from ports import free_port

SETTINGS = ClassImageGeneration(num_inference_steps=2, guidance_scale=3.0, batch_size=2, seed=5)


def run_ranks(call, folder: Path, processes: int = 2, timeout: float = 60) -> list[str]:
    """`call(accelerator)` in `processes` processes forked from this one, joined over gloo as `accelerate launch` joins
    them: by rank, "done" or the line of what it raised (its type's name first). One still running after `timeout` s (a
    process left waiting in a collective: gloo's own timeout is 30 minutes) is killed and fails the test."""
    port, children = str(free_port()), []
    for rank in range(processes):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(processes), LOCAL_WORLD_SIZE=str(processes),
                                  RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0")  # fmt: skip
                torch.set_num_threads(1)
                from accelerate import Accelerator
                from accelerate.state import PartialState

                from finetune.accelerate_state import clear_accelerate_settings

                clear_accelerate_settings()
                PartialState._reset_state()  # the test process's own (one process) is not this launch's
                try:
                    call(Accelerator(cpu=True))
                    said = "done"
                except Exception as err:  # what the run would end with on this process
                    said = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                (folder / f"rank{rank}.txt").write_text(said)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        children.append(pid)
    deadline, waiting = time.monotonic() + timeout, set(children)
    while waiting and time.monotonic() < deadline:
        waiting -= {pid for pid in waiting if os.waitpid(pid, os.WNOHANG)[0] != 0}
        time.sleep(0.05)
    for pid in waiting:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    said = [(folder / f"rank{rank}.txt").read_text() if (folder / f"rank{rank}.txt").exists() else "killed: still running" for rank in range(processes)]
    assert not waiting, f"processes still running after {timeout} s: {said}"
    return said


@pytest.fixture
def nan_on_rank_1(monkeypatch):
    """The pipeline call made by process 1 decodes to NaN (a guidance far too high, on its prompts); process 0's are fine."""

    def make(pipeline, class_prompts, batch, settings, resolution):
        value = float("nan") if os.environ["RANK"] == "1" else 0.5
        return torch.full((len(batch), 3, 8, 8), value)

    monkeypatch.setattr(class_images, "_make", make)
    monkeypatch.setattr(class_images, "chunks_needed", lambda tokenizer, prompts: 1)  # no tokenizer: every prompt fits one chunk


def test_class_images_that_decode_to_nan_on_one_process_stop_every_process_with_its_line(nan_on_rank_1, tmp_path):
    """Before, process 1 raised alone while process 0 waited for it in the barrier after generating, which then ended in gloo's
    traceback of a closed connection once process 1 had exited."""
    folder, pipeline = tmp_path / "class", SimpleNamespace(tokenizer=None, image_processor=VaeImageProcessor())

    def generate(accelerator):
        generate_on_every_process(accelerator, lambda: generate_class_images(
            pipeline, ["a shape"], folder, "key", [0, 1, 2, 3], SETTINGS, 8, accelerator.process_index, accelerator.num_processes))  # fmt: skip

    said = run_ranks(generate, tmp_path)
    assert said[0] == said[1] and said[0].startswith("FinetuneError: class images of the class prompt 'a shape' decoded to NaN"), said
    assert sorted(path.name for path in folder.glob("*.png")) == ["key-00000.png", "key-00002.png"]  # process 0's share: kept


def test_processes_with_nothing_to_generate_wait_for_those_that_make_images(tmp_path):
    """A process with no share (None) still meets the others in the same collective: the run goes on on both."""
    assert run_ranks(lambda accelerator: generate_on_every_process(accelerator, None if accelerator.process_index else lambda: None), tmp_path) == ["done", "done"]
