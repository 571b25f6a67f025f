"""finetune: fine-tune Stable Diffusion on your own images (LoRA, DreamBooth, ControlNet)."""

__version__ = "0.1.0"
