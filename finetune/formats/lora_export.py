"""`finetune export`: a LoRA file (or a run's, or a checkpoint's) written in another layout (`finetune.formats.kohya`'s
kohya or diffusers) and precision, with its model card (`finetune.formats.model_card`) and the card's images; what either
would replace is refused unless --overwrite, and a stop between them leaves neither."""

from __future__ import annotations

import os
from pathlib import Path

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME, checkpoint_folder_step, resolve_lora_file, webui_lora_stem
from finetune.errors import FinetuneError
from finetune.formats.kohya import load_lora, save_lora_file
from finetune.formats.model_card import card_images, model_card_path, write_model_card


def resolve_output_file(output: Path, layout: str, source: Path) -> Path:
    """A .safetensors path is used as given; a folder gets the conventional name for the layout."""
    if output.suffix.lower() == ".safetensors":
        return output
    run_name = webui_lora_stem(source)  # the webui lists a LoRA by its file name: the run's (and a checkpoint's step)
    return output / (f"{run_name}.safetensors" if layout == "kohya" else LORA_WEIGHTS_NAME)


def export_lora(source: Path, output: Path, layout: str, overwrite: bool = False, precision: str | None = None) -> tuple[Path, Path, list[Path]]:
    """Convert `source` (a file or training folder) to `layout`; write the file and its model card.
    Files already there (an earlier export, a trained LoRA, the user's README) are replaced only with `overwrite`.
    Returns (the file, its card, the card's images: see `write_model_card`)."""
    # Absolute, so that the run's name and a checkpoint's step are found from its folders: `export . webui` in the run wrote .safetensors
    source = Path(os.path.abspath(resolve_lora_file(str(source))))
    destination = resolve_output_file(Path(output), layout, source)
    if destination.resolve() == source.resolve():
        raise FinetuneError(f"export would write {destination} over the LoRA it reads: give another output")
    if destination.is_dir():  # a folder named *.safetensors: --overwrite ended in a traceback renaming the file onto it
        raise FinetuneError(f"export output {destination} is a folder: give a .safetensors file path, or a folder name without that ending")
    # A checkpoint's card shows its run's samples up to its step.
    step = checkpoint_folder_step(source.parent)  # of a LoRA file a run's checkpoint holds, else None
    training_dir = source.parent if step is None else source.parent.parent.parent
    # The card's images too: a webui folder's <name>.preview.png, the user's own thumbnail, was written over unasked.
    written = [destination, model_card_path(destination, layout), *filter(None, card_images(destination, layout, training_dir, step)[1:])]
    existing = [path for path in written if path.exists()]
    if existing and not overwrite:
        raise FinetuneError(f"export would replace {', '.join(map(str, existing))}: give another output, or pass --overwrite")
    lora = load_lora(source)
    made = [path for path in written if path not in existing]
    try:
        path = save_lora_file(lora, destination, layout, precision)
        return path, *write_model_card(lora, path, layout, training_dir=training_dir, precision=precision, up_to_step=step)
    except BaseException:
        # A stop (Ctrl-C, a full disk) between the file and its card left the file alone, and the rerun that the stop's
        # line asks for was then refused as replacing it: the export is both or neither of what was not there before.
        for path in made:
            path.unlink(missing_ok=True)
        raise
