"""A LoRA file is read whole into memory (`kohya.read_whole`), not served from a memory map of the file: a LoRA loaded
(the demo's cache, a merge, sample) whose file a second run then truncated and wrote again in place killed the
process with a bus error as soon as its weights were used."""

from __future__ import annotations

from forked import run_forked


def truncated_while_loaded(path: str) -> int:
    """Load a LoRA, truncate its file and write other bytes in place, then use every page of its weights. Run in a process
    of its own: with the memory map, that use is a SIGBUS, which would end pytest."""
    import os

    import torch
    from safetensors.torch import save_file

    from finetune.formats.kohya import load_lora

    down, up = torch.randn(4, 65536), torch.randn(65536, 4)  # a megabyte each: pages of their own, past the header's
    save_file({"unet.mid_block.attentions.0.proj_in.lora.down.weight": down, "unet.mid_block.attentions.0.proj_in.lora.up.weight": up},
              path, metadata={"finetune.rank": "4"})  # fmt: skip
    lora = load_lora(path)
    os.truncate(path, 0)  # as open(path, "wb") does before the second run's bytes
    with open(path, "r+b") as rewritten:
        rewritten.write(b"not yet a whole file")
    layer = lora.layers["unet.mid_block.attentions.0.proj_in"]
    used = layer.down.clone(), layer.up.clone()  # every page of them read (torch.equal stops at the first difference)
    print(torch.equal(used[0], down) and torch.equal(used[1], up), lora.metadata["finetune.rank"])
    return 0


def test_a_loaded_lora_whose_file_is_truncated_and_rewritten_in_place_keeps_its_weights(tmp_path):
    # A fork of this process, not a fresh interpreter: the same process of its own, without 10 CPU s of imports.
    ran = run_forked(lambda: truncated_while_loaded(str(tmp_path / "lora.safetensors")), timeout=120)
    assert ran.returncode == 0, f"exit {ran.returncode} (-7: bus error): {ran.output[-2000:]}"
    assert ran.output.split()[-2:] == ["True", "4"], ran.output[-2000:]


def test_a_file_that_is_no_lora_is_refused_from_its_header_before_it_is_read_whole(tmp_path):
    """A base model given as --lora (both are .safetensors, often side by side) was read whole, and each tensor copied out
    of the bytes, before its names said it holds no LoRA: twice the file in memory (14 GB for an SDXL checkpoint) for a
    one-line refusal, where a memory map had left it to the page cache. Its names are in its header."""
    import tracemalloc

    import pytest
    import torch
    from safetensors.torch import save_file

    from finetune.errors import FinetuneError
    from finetune.formats.kohya import load_lora

    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4_000_000)}, str(path))  # 16 MB
    tracemalloc.start()
    try:
        with pytest.raises(FinetuneError, match="holds no SD1.x LoRA weights"):
            load_lora(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < path.stat().st_size // 4, f"{peak:,} bytes held to refuse a file of {path.stat().st_size:,}"
