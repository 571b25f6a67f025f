"""finetune: fine-tune Stable Diffusion on your own images (LoRA, DreamBooth, ControlNet)."""

from finetune.library_noise import quiet_bitsandbytes_cpu_kernel_note, quiet_torchvision_fallback_notes

__version__ = "0.1.0"

# Before any module of the package imports diffusers (which imports bitsandbytes and transformers): from Python as from
# the command line.
quiet_bitsandbytes_cpu_kernel_note()
quiet_torchvision_fallback_notes()
