"""The benchmark's variants: a name, what it is, and how its recipe is built from the common one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from finetune.bench.runner import BenchSettings


# ---------------------------------------------------------------------------------------------------
# Variants: a name, what it is, and its recipe


@dataclass(frozen=True)
class Variant:
    description: str
    build: Callable[[dict, "BenchSettings"], dict]  # (common recipe, settings) -> recipe dict
    # Set for the variant's process: what `accelerate launch` options would set (e.g. --dynamo_backend).
    environment: dict[str, str] = field(default_factory=dict)
    # torch.backends.cudnn.benchmark in the variant's process (the trainer leaves torch's default, off): whether
    # cuDNN's autotuner, timing each convolution shape's algorithms once, speeds the UNet's convolutions on a GPU.
    cudnn_benchmark: bool = False

    @property
    def compiles(self) -> bool:
        """Whether the variant's trained module is compiled (and checks its gradients against eager's)."""
        return self.environment.get("ACCELERATE_DYNAMO_BACKEND", "NO").upper() != "NO"


def _lora(common: dict, settings: "BenchSettings", **train) -> dict:
    return {**common, "method": "lora", "train": {**common["train"], **train}}


def _dreambooth(common: dict, settings: "BenchSettings", adapter: str) -> dict:
    recipe = {key: value for key, value in common.items() if key != "data"}
    recipe["data"] = {key: value for key, value in common["data"].items() if key != "image_dir"}
    recipe["method"] = "dreambooth"
    recipe["dreambooth"] = {
        "concepts": [
            {
                "instance_dir": str(settings.data_dir),
                "instance_prompt": "a photo of sks shape",
                "class_prompt": "a photo of a shape",
                "class_dir": str(settings.class_dir),  # already filled: no class images are generated
            }
        ],
        "adapter": adapter,
        "prior_preservation": True,
        "num_class_images": settings.num_images,
    }
    # Instance images plus as many class images: the UNet sees `batch` images, as in the other rows.
    recipe["train"] = {**common["train"], "batch_size": dreambooth_instances(settings.batch)}
    if adapter == "full":
        recipe["optimizer"] = {**common["optimizer"], "name": "adamw8bit", "lr": 5.0e-6}  # as recipes/dreambooth.yaml
    return recipe


def _controlnet(common: dict, settings: "BenchSettings") -> dict:
    return {**common, "method": "controlnet"}


VARIANTS: dict[str, Variant] = {
    "lora": Variant("LoRA (rank 16, attention), VAE and text encoder run every step", lambda c, s: _lora(c, s)),
    "lora_cached": Variant(
        "LoRA with cached VAE latents and text embeddings", lambda c, s: _lora(c, s, cache_latents=True, cache_text_embeddings=True)
    ),
    "lora_gc": Variant("LoRA with gradient checkpointing", lambda c, s: _lora(c, s, gradient_checkpointing=True)),
    "lora_cl": Variant("LoRA with channels-last UNet and VAE", lambda c, s: _lora(c, s, channels_last=True)),
    "lora_cached_cl": Variant(
        "LoRA, cached latents and embeddings, channels-last",
        lambda c, s: _lora(c, s, cache_latents=True, cache_text_embeddings=True, channels_last=True),
    ),
    # torch.compile as `accelerate launch --dynamo_backend inductor` applies it (to the trained UNet);
    # the compile happens in the first step, which --warmup leaves out of the timing.
    "lora_compiled": Variant("LoRA, UNet compiled with torch.compile (inductor)", lambda c, s: _lora(c, s), {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}),
    "lora_cached_compiled": Variant(
        "LoRA, cached latents and embeddings, UNet compiled (inductor)",
        lambda c, s: _lora(c, s, cache_latents=True, cache_text_embeddings=True),
        {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"},
    ),
    # `--dynamo_mode reduce-overhead`: inductor plus CUDA graphs, which replay a step's thousands of kernel
    # launches as one (an eager SD1.5 LoRA step at batch 4 waits on the CPU's launches: docs/benchmarks-gpu.md).
    # On a CPU there are no CUDA graphs and this is lora_cached_compiled.
    "lora_cached_cudagraphs": Variant(
        "LoRA, cached latents and embeddings, UNet compiled with CUDA graphs (reduce-overhead)",
        lambda c, s: _lora(c, s, cache_latents=True, cache_text_embeddings=True),
        {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR", "ACCELERATE_DYNAMO_MODE": "reduce-overhead"},
    ),
    # On an H200 a quarter of the eager step's GPU time was cuDNN's convolutions, half of it converting NCHW tensors
    # to NHWC, with the algorithms its heuristics pick (docs/benchmarks-gpu.md). No effect on a CPU.
    "lora_cached_cudnn_benchmark": Variant(
        "LoRA, cached latents and embeddings, cuDNN autotuning its convolutions (torch.backends.cudnn.benchmark)",
        lambda c, s: _lora(c, s, cache_latents=True, cache_text_embeddings=True),
        cudnn_benchmark=True,
    ),
    "dreambooth": Variant("DreamBooth, full UNet, prior preservation, 8-bit AdamW", lambda c, s: _dreambooth(c, s, "full")),
    "dreambooth_lora": Variant("DreamBooth with a LoRA adapter, prior preservation", lambda c, s: _dreambooth(c, s, "lora")),
    "controlnet": Variant("ControlNet (trainable encoder copy), frozen UNet", lambda c, s: _controlnet(c, s)),
    # accelerate compiles the trained module only: the ControlNet, not the frozen UNet it feeds (half the step's work).
    "controlnet_compiled": Variant(
        "ControlNet, the ControlNet compiled (inductor; the frozen UNet is not)", lambda c, s: _controlnet(c, s), {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}
    ),
}


# Compiling takes minutes on a CPU (about 2 for the medium preset on 2 cores), and cuDNN's autotuner is for GPUs:
# ask for those by name.
DEFAULT_VARIANTS = [name for name, variant in VARIANTS.items() if not variant.environment and not variant.cudnn_benchmark]


def dreambooth_instances(batch: int) -> int:
    return max(1, batch // 2)


def images_per_step(name: str, batch: int) -> int:
    return 2 * dreambooth_instances(batch) if name.startswith("dreambooth") else batch
