"""The LoRA UNet compiles whole: torch.compile (`accelerate launch --dynamo_backend inductor`, the bench's compiled
variants) is the route to fusing the step's casts and elementwise work on a GPU (docs/benchmarks-gpu.md), and every
graph break would split the UNet into pieces run apart, with Python between them. Traced only (no inductor)."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from finetune.config import LoRAConfig, ModelConfig
from finetune.methods.lora import add_lora
from finetune.models.loading import load_base_model
from finetune.training.accelerate_state import clear_accelerate_settings


def test_the_lora_unet_under_accelerates_bf16_wrapper_is_one_graph(tiny_model):
    base = load_base_model(ModelConfig(pretrained=str(tiny_model)), torch.bfloat16)
    add_lora(base.unet, ["to_q", "to_k", "to_v", "to_out.0"], torch.bfloat16, LoRAConfig(rank=4, alpha=4))  # the recipes' targets
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    try:
        unet = accelerator.prepare(base.unet)  # autocast and the fp32 outputs wrapped around its forward, as in training
        latents, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
        text = torch.randn(2, 77, unet.config.cross_attention_dim, dtype=torch.bfloat16)
        with accelerator.autocast():
            explained = torch._dynamo.explain(lambda: unet(latents, timesteps, text, return_dict=False)[0])()
    finally:
        clear_accelerate_settings()  # as train() does: a later Accelerator in this process may take another precision
        torch._dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), [reason.reason for reason in explained.break_reasons]
