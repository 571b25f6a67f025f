"""A single-file base (.safetensors) that cannot be read as given: one clean line, whatever diffusers says."""

import logging.handlers

import pytest
from test_single_file import sd15_shaped_pipeline

from finetune.cli import main
from finetune.single_file_export import export_checkpoint


@pytest.fixture
def single_file(tmp_path):
    sd15_shaped_pipeline(tmp_path).save_pretrained(tmp_path / "configs")
    return export_checkpoint(tmp_path / "configs", tmp_path / "model.safetensors")[0]


def errors(capfd) -> list[str]:
    return [line for line in capfd.readouterr().err.splitlines() if line.strip() and not line.startswith("Loading")]  # progress bars


def test_a_single_file_base_that_cannot_load_is_one_whole_line(single_file, tmp_path, capfd):
    from conftest import SHIPPED_BASE

    errors(capfd)
    # Configs of another architecture: diffusers' sentence whole (it was cut at 300 characters, mid-word), not its advice.
    assert main(["sample", "--base", str(single_file), "--base-config", str(SHIPPED_BASE), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    err = errors(capfd)
    assert len(err) == 1 and err[0].endswith("but got torch.Size([77, 32]). (give --base-config the diffusers folder or hub id of the model this file was made from)"), err
    # No configs, offline: diffusers' two lines ("local_files_only is True ... Attempting to download") no longer come first.
    # (Its handler writes to the stderr of when diffusers was imported, which pytest may hold: its records are watched too.)
    logged = logging.handlers.BufferingHandler(100)
    logging.getLogger("diffusers.loaders.single_file").addHandler(logged)
    try:
        assert main(["sample", "--base", str(single_file), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    finally:
        logging.getLogger("diffusers.loaders.single_file").removeHandler(logged)
    err = errors(capfd)
    assert len(err) == 1 and err[0].startswith(f"error: could not read base model file {single_file}: "), err
    assert not [record.getMessage() for record in logged.buffer if "local_files_only" in record.getMessage()]
