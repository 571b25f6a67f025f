"""A LoRA exported to sd-scripts' layout, and read back as a file from sd-scripts itself would be."""

from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from finetune.cli.main import main
from finetune.formats.kohya import LoRA, load_lora


def sd_scripts_round_trip(source: Path, folder: Path) -> tuple[dict[str, str], LoRA]:
    """(the exported file's metadata, the LoRA read from a copy that keeps only sd-scripts' own `ss_` keys)."""
    assert main(["export", str(source), str(folder), "--to", "kohya"]) == 0
    [kohya_file] = folder.glob("*.safetensors")
    with safe_open(str(kohya_file), "pt") as f:
        metadata = f.metadata()
    theirs = {key: value for key, value in metadata.items() if not key.startswith("finetune.")}
    save_file(load_file(kohya_file), folder.parent / "sd-scripts.safetensors", theirs)
    return metadata, load_lora(folder.parent / "sd-scripts.safetensors")
