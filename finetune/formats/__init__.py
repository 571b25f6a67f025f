"""The files creators use elsewhere: LoRA layouts (ours, kohya's), DoRA, merging, single-file export, model cards."""
