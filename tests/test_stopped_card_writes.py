"""A stop while a model card is written leaves the card whole or not there, never half of it: merge's README.md (written
once the merged pipeline is in place), a trained pipeline's README.md, an exported LoRA's card and webui preview, and
bench's report (rewritten after every variant) are written under a temporary name and renamed into place."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from test_stopped_writes import stopped_halfway_through_write_text


def left_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_a_stop_while_merge_writes_its_card_leaves_no_half_card(tmp_path, monkeypatch):
    from finetune.formats.merge import _write_card

    lora = SimpleNamespace(common_rank_alpha=lambda: (4, 4.0), layers={"unet.down.0": None}, metadata={"finetune.steps": "10"})
    stopped_halfway_through_write_text(monkeypatch, "README.md")
    with pytest.raises(KeyboardInterrupt):
        _write_card(tmp_path, "base", tmp_path / "lora.safetensors", lora, 1.0)
    assert left_in(tmp_path) == []


def test_a_stop_while_a_trained_pipelines_card_is_written_leaves_no_half_card(tmp_path, monkeypatch):
    from finetune.formats.model_card import write_pipeline_card

    folder = tmp_path / "run" / "pipeline"
    folder.mkdir(parents=True)
    stopped_halfway_through_write_text(monkeypatch, "README.md")
    with pytest.raises(KeyboardInterrupt):
        write_pipeline_card(folder, {"finetune.method": "full", "finetune.steps": "10"})
    assert left_in(folder) == []


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_a_stop_while_an_exported_loras_card_is_written_leaves_no_half_card(tmp_path, monkeypatch, layout):
    import torch

    from finetune.formats.kohya import LoRA, LoRALayer
    from finetune.formats.model_card import model_card_path, write_model_card

    lora = LoRA({"unet.down.0": LoRALayer(down=torch.zeros(4, 8), up=torch.zeros(8, 4), alpha=4.0)})
    path = tmp_path / ("lora.safetensors" if layout == "kohya" else "lora/pytorch_lora_weights.safetensors")
    path.parent.mkdir(exist_ok=True)
    stopped_halfway_through_write_text(monkeypatch, model_card_path(path, layout).name)
    with pytest.raises(KeyboardInterrupt):
        write_model_card(lora, path, layout)
    assert left_in(path.parent) == []


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_an_export_stopped_before_its_card_leaves_no_file_so_its_rerun_is_not_refused(tmp_path, monkeypatch, layout):
    """The stop's line says to run the command again: a LoRA file left without its card made that rerun ask for --overwrite."""
    import torch

    from finetune.formats.kohya import LoRA, LoRALayer, save_lora_file
    from finetune.formats.lora_export import export_lora

    source = save_lora_file(LoRA({"unet.down.0": LoRALayer(down=torch.zeros(4, 8), up=torch.zeros(8, 4), alpha=4.0)}), tmp_path / "trained.safetensors", "kohya")
    with monkeypatch.context() as stopped:
        stopped_halfway_through_write_text(stopped, ".md" if layout == "kohya" else "README.md")
        with pytest.raises(KeyboardInterrupt):
            export_lora(source, tmp_path / "webui", layout)
    assert left_in(tmp_path / "webui") == []
    path, card, _ = export_lora(source, tmp_path / "webui", layout)  # the same command again, without --overwrite
    assert path.is_file() and card.is_file()


def test_a_stop_while_bench_writes_its_report_leaves_no_half_report(tmp_path, monkeypatch):
    """The report is written after a variant stopped too (its row says how far it got): a second Ctrl-C then left half
    of it. (The variant's process is stood in for: it is stopped at once.)"""
    from finetune.bench import runner

    real_run = runner.subprocess.run

    def process(argv, **kwargs):
        if "--worker" not in argv:
            return real_run(argv, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.subprocess, "run", process)
    stopped_halfway_through_write_text(monkeypatch, "bench.json")
    with pytest.raises(KeyboardInterrupt):
        runner.run_benchmark(preset="tiny", steps=2, warmup=1, batch=2, num_images=2, variants=["lora"], count_flops=False,
                             workdir=tmp_path / "work", out=tmp_path / "report" / "bench.json", log=lambda line: None)  # fmt: skip
    assert left_in(tmp_path / "report") == []
