"""Under `accelerate launch` every process runs the same command: each line of a run is said once, by the
main process (rank 0), not once per machine by each machine's first process (local rank 0), which said
the recipe's warnings, the class-image and cache lines and 'stopped at step N' again on every machine.
A line about one machine's own state (its bitsandbytes) is said by each machine, naming it. The ranks are
faked through the environment torchrun sets (and `finetune.console` reads)."""

import os
import signal
import sys
from pathlib import Path

import torch

from finetune.config import OptimizerConfig
from finetune.config.recipe_loading import load_recipe
from finetune.data.cache import EncodingCache
import finetune.data.cache
from finetune.optim.optimizers import build_optimizer
from finetune.training.trainer import train

RECIPES = Path(__file__).parent.parent / "recipes"
UNUSED = [f"dreambooth.concepts.0.instance_dir={RECIPES.parent / 'datasets' / 'star'}", "dreambooth.prior_preservation=false"]


def as_process(monkeypatch, rank: int, local_rank: int, machines: int = 2) -> None:
    """This process as torchrun starts process `rank` of 2 per machine."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("GROUP_RANK", str(rank // 2))
    monkeypatch.setenv("WORLD_SIZE", str(2 * machines))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")


def test_the_recipes_warnings_are_said_by_the_main_process_alone(monkeypatch, capsys):
    as_process(monkeypatch, rank=2, local_rank=0)  # the second machine's first process
    load_recipe(RECIPES / "dreambooth.yaml", UNUSED)
    assert capsys.readouterr().err == ""
    as_process(monkeypatch, rank=0, local_rank=0)
    load_recipe(RECIPES / "dreambooth.yaml", UNUSED)
    assert capsys.readouterr().err.startswith("warning: dreambooth.prior_preservation is false")


def test_a_machine_without_bitsandbytes_says_so_naming_itself(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    parameter = torch.nn.Parameter(torch.zeros(4))
    for rank, local_rank in ((1, 1), (2, 0)):  # the first machine's second process, the second machine's first
        as_process(monkeypatch, rank, local_rank)
        build_optimizer(OptimizerConfig(name="adamw8bit", lr=1e-3), [parameter])
    assert capsys.readouterr().out.startswith("warning: machine 1: optimizer.name=adamw8bit: bitsandbytes cannot run here")
    as_process(monkeypatch, rank=0, local_rank=0, machines=1)  # one machine: nothing to tell apart
    build_optimizer(OptimizerConfig(name="adamw8bit", lr=1e-3), [parameter])
    assert capsys.readouterr().out.startswith("warning: optimizer.name=adamw8bit: bitsandbytes cannot run here")


def test_a_damaged_cache_entry_two_processes_meet_is_told_once(tmp_path, monkeypatch, capsys):
    """Every process reads the DreamBooth instance prompt's entry at the first step: each said it was damaged.
    Now the process that removes it says so (any process may be the one), the others find it gone."""
    ours, theirs = EncodingCache(tmp_path), EncodingCache(tmp_path)
    (tmp_path / "k.safetensors").write_bytes(b"cut short")
    real = finetune.data.cache.load_file

    def load_file(path):  # while this process reads it, the other reads it, finds it damaged and removes it
        monkeypatch.setattr(finetune.data.cache, "load_file", real)
        assert theirs._load("k") is None
        return real(path)

    monkeypatch.setattr(finetune.data.cache, "load_file", load_file)
    assert ours._load("k") is None
    assert capsys.readouterr().out == f"warning: cache entry {tmp_path / 'k.safetensors'} is damaged: encoding it again\n"


def test_a_stopped_run_is_told_by_the_main_process_alone(make_recipe, tmp_path, monkeypatch, capsys):
    """A Ctrl-C at step 1: the main process says every line, 'stopped at step 1' last, under the progress bar;
    the first process of another machine (only `finetune.console` is told so) says none of them."""
    stop = lambda step: os.kill(os.getpid(), signal.SIGINT)  # noqa: E731 - the trainer's handler takes it
    assert train(make_recipe(train__max_steps=3), on_step=stop).interrupted
    said = capsys.readouterr().out.splitlines()
    assert said[0].startswith("training on 1 process") and said[-1].startswith(f"stopped at step 1; checkpoint saved in {tmp_path / 'run' / 'checkpoints'}")
    # Not RANK: accelerate would read it and wait for a process group. (Were `main_process` renamed, lines would be said.)
    monkeypatch.setattr("finetune.console.main_process", lambda: False, raising=False)
    assert train(make_recipe(output_dir=str(tmp_path / "other"), train__max_steps=3), on_step=stop).interrupted
    assert capsys.readouterr().out == ""
