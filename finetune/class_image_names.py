"""How DreamBooth names the class images it generates, and what that leaves unused of a concept's class prompts:
apart from `finetune.class_images` (torch) so that `finetune check-data` says what training says at its start."""

from __future__ import annotations

from pathlib import Path

from finetune.sources import folder_images


def is_generated_name(path: Path) -> bool:
    """`<key>-<k>.png` as generation names them: a key of 10 lowercase hex digits (a user's own
    "photo_0001-00001.png" is a class image of theirs, not a generated one of other settings)."""
    stem = path.stem
    return len(stem) == 16 and stem[10] == "-" and stem[11:].isdigit() and all(c in "0123456789abcdef" for c in stem[:10])


def unused_class_prompts_warning(index: int, class_prompts: list[str], num_class_images: int, folder: Path, paths: list[Path]) -> str | None:
    """The warning line for the class prompts of dreambooth.concepts[`index`] that make no class image, or None.
    Generated image k comes from prompt k mod n, and only the images the user's own leave to make are generated
    (their own train with the first prompt): 2 own of num_class_images 4 with 3 prompts never use the third.
    `paths`: the class images planned (`plan_class_images`), the user's own first."""
    own = sum(1 for p in paths if not is_generated_name(p))  # at most num_class_images of the folder's own
    prompts, generated = len(class_prompts), len(paths) - own
    unused = prompts - max(min(generated, prompts), 1 if own else 0)
    if unused <= 0:
        return None
    all_own = sum(1 for p in folder_images(folder) if not is_generated_name(p)) if folder.is_dir() else 0
    yours = f", {own} of them your own images in {folder}" if own else ""
    return (f"warning: dreambooth.concepts[{index}] lists {prompts} class prompts and dreambooth.num_class_images is {num_class_images}{yours}: "
            f"{f'the last {unused} prompts make' if unused > 1 else 'the last prompt makes'} no class image; raise num_class_images to at least {all_own + prompts}")
