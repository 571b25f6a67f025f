"""What the DoRA tests share: the layers they adapt, a prompt, a short DoRA run and diffusers' loading of its file."""

from diffusers import StableDiffusionPipeline

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
from finetune.training.trainer import train

# The attention, a 1x1 (proj_in) and a 3x3 (conv1) convolution: peft decomposes Linear and Conv2d layers alike.
DORA = dict(lora__use_dora=True, lora__target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"], lora__rank=4, lora__alpha=2)
PROMPTS = ["a red circle"]


def train_dora(make_recipe):
    """(recipe, LoRA file) of two steps of a DoRA with the text encoder's layers too."""
    recipe = make_recipe(train__max_steps=2, optimizer__lr=1e-2, lora__train_text_encoder=True, **DORA)
    return recipe, train(recipe).output_dir / LORA_WEIGHTS_NAME


def loaded_by_diffusers(model_folder, lora_file):
    pipeline = StableDiffusionPipeline.from_pretrained(model_folder)
    pipeline.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    return pipeline
