"""Validation and the held-out loss call the trained modules uncompiled (`finetune.distributed.processes.uncompiled_forwards`): each
would compile a graph of its own. torch 2.6's stance does it; on torch 2.4 and 2.5 (pyproject allows them), which lack it,
the held-out loss compiled an extra graph: there the module under torch.compile's wrapper is called as the module it wraps
(a compiled run without the stance: tests/test_compiled_runs.py)."""

import torch

from finetune.distributed.processes import uncompiled_forwards


def test_without_torchs_stance_a_compiled_module_is_called_as_the_module_it_wraps(monkeypatch):
    plain, frozen = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    modules = {"unet": torch.compile(plain), "text_encoder": frozen}  # compiled at its first call, which never comes here
    compiled = modules["unet"]
    monkeypatch.delattr(torch.compiler, "set_stance")  # as on torch 2.4 and 2.5
    with uncompiled_forwards(modules) as forwards:
        assert forwards["unet"] is plain and forwards["text_encoder"] is frozen
    assert modules == {"unet": compiled, "text_encoder": frozen}  # the run's own modules as they were


def test_with_torchs_stance_the_modules_are_called_as_they_are_and_run_eagerly(monkeypatch):
    modules = {"unet": torch.compile(torch.nn.Linear(2, 2))}
    stances = []
    monkeypatch.setattr(torch.compiler, "set_stance", lambda stance: stances.append(stance) or torch.no_grad())
    with uncompiled_forwards(modules) as forwards:
        assert forwards is modules and stances == ["force_eager"]

