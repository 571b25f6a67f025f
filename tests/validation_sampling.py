"""What a method's validation samples with at a step, read without drawing: for the tests of an adapter the run starts
from (lora.init_from, controlnet.pretrained) that records another prediction type than the run trains for."""

from accelerate import Accelerator

from finetune.training.accelerate_state import clear_accelerate_settings
from finetune.training.validation import run_validation


def sampled_as(method, step: int) -> str:
    """The prediction type the scheduler of `method`'s validation pipeline reads its model's output as at `step`."""
    seen = []
    method.validation_images = lambda modules: (seen.append(method.pipeline(modules).scheduler.config.prediction_type), ([], []))[1]
    try:
        run_validation(method.recipe, method, method.trained_modules(), Accelerator(cpu=True), step)
    finally:  # as train() does: a later test's Accelerator in this process may take another precision
        clear_accelerate_settings()
    return seen[0]
