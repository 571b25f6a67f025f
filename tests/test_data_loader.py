"""data.num_workers past the CPUs this process may use is capped, with one warning: 1000000 set a million worker
processes starting once the model had loaded, without a word."""

import os

import pytest

from finetune.data.loader import training_loader


@pytest.mark.parametrize("asked", [3, 1_000_000])
def test_workers_past_the_cpus_are_capped_with_one_warning(asked, monkeypatch, capsys):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    loader = training_loader(list(range(4)), [[0, 1], [2, 3]], None, asked, seed=0)
    assert loader.num_workers == 2  # no worker starts until the loader is iterated
    assert capsys.readouterr().out.splitlines() == [
        f"warning: data.num_workers ({asked}) is more than the 2 CPUs this process may use: starting 2 data workers "
        "(more would only take turns on them); set data.num_workers to at most 2 to silence this"
    ]


@pytest.mark.parametrize("asked", [0, 2])
def test_workers_within_the_cpus_are_as_asked(asked, monkeypatch, capsys):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    loader = training_loader(list(range(4)), [[0, 1], [2, 3]], None, asked, seed=0)
    assert loader.num_workers == asked and (loader.worker_init_fn is not None) == (asked > 0)
    assert capsys.readouterr().out == ""
