"""When each LoRA gradient is ready in a training step's backward, with the LoRA weights cast together
(`finetune.models.lora_casts`) and with autocast's cast per layer: what DDP could overlap. DDP all-reduces a bucket of
gradients (1 MiB first, then 25 MiB each, in the reverse of the parameters' order) as soon as all of its gradients are
accumulated; a bucket ready before the backward's last kernel can be reduced while the backward runs. The casts'
backward is one node, which runs when every LoRA layer has given it its gradient: every LoRA gradient is ready at once.

`python tests/grad_readiness.py` measures the bench's cached LoRA (medium preset: SD1.5's block pattern, batch 4, 64 px,
bf16, its 4th step): for each bucket DDP would make, the share of the backward's kernels still to run when it is ready."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))


class BackwardKernels(TorchDispatchMode):
    """Counts the backward's kernels (operators run by an autograd node, neither views nor allocations)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from step_phases import ALLOCATIONS

        out = func(*args, **(kwargs or {}))
        if torch._C._current_autograd_node() is not None and not func.is_view and func.overloadpacket not in ALLOCATIONS:
            self.count += 1
        return out


def ddp_buckets(parameters: list[torch.nn.Parameter], first: int = 1 << 20, cap: int = 25 << 20) -> list[list[int]]:
    """DDP's bucket assignment (torch.distributed's default caps): indices into `parameters`, taken in reverse order."""
    buckets, current, size, limit = [], [], 0, first
    for index in reversed(range(len(parameters))):
        current.append(index)
        size += parameters[index].numel() * parameters[index].element_size()
        if size >= limit:
            buckets.append(current)
            current, size, limit = [], 0, cap
    return buckets + ([current] if current else [])


def measure(workdir: Path, cast_together: bool) -> tuple[list[dict], int, list[float]]:
    """(a row per DDP bucket: its bytes and the backward's kernels left when it was ready, the backward's kernels, losses)."""
    from finetune.bench.runner import BenchSettings, common_recipe, prepare_data, prepare_model
    from finetune.bench.variants import VARIANTS
    from finetune.config.recipe_loading import recipe_from_dict
    import finetune.methods.lora as lora_method
    import finetune.models.lora_unit_scale as lora_unit_scale
    from finetune.training.trainer import train

    settings = BenchSettings("medium", 2, 2, 4, 64, "bf16", 8, False, None)
    model_dir = str(prepare_model("medium", workdir / "models" / "medium", print))
    settings.data_dir, settings.class_dir = prepare_data(workdir, 8, 64)
    recipe = VARIANTS["lora_cached"].build(common_recipe(settings, model_dir, workdir / "runs" / "lora_cached"), settings)
    recipe["train"].update(max_steps=4)

    counting, ready, trained = BackwardKernels(), {}, []
    original_skip, original_cast = lora_method.skip_unit_scales, lora_unit_scale.cast_together

    def skip_and_watch(model):
        changed = original_skip(model)
        trained.extend(p for p in model.parameters() if p.requires_grad)
        for index, parameter in enumerate(trained):
            parameter.register_post_accumulate_grad_hook(lambda _, index=index: ready.__setitem__(index, counting.count))
        return changed

    def on_step(step: int) -> None:
        if step == 3:
            ready.clear()
            counting.__enter__()
        elif step == 4:
            counting.__exit__(None, None, None)

    lora_method.skip_unit_scales = skip_and_watch
    if not cast_together:
        lora_unit_scale.cast_together = lambda model, layers: None
    try:
        result = train(recipe_from_dict(recipe), on_step=on_step, overwrite=True)
    finally:
        lora_method.skip_unit_scales, lora_unit_scale.cast_together = original_skip, original_cast
    total = counting.count
    rows = [{"bytes": sum(trained[i].numel() * trained[i].element_size() for i in bucket), "parameters": len(bucket),
             "kernels_left": total - max(ready[i] for i in bucket)} for bucket in ddp_buckets(trained)]
    return rows, total, result.losses


def main() -> None:
    workdir = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/grad-readiness")
    for together in (True, False):
        rows, total, losses = measure(workdir, together)
        print(f"weights cast {'together' if together else 'per layer (autocast)'}: the backward's {total} kernels, losses {losses}")
        for number, row in enumerate(rows):
            print(f"  bucket {number}: {row['parameters']} tensors, {row['bytes'] / 2**20:.2f} MiB, ready with {row['kernels_left']} "
                  f"of the backward's kernels left ({row['kernels_left'] / total:.1%})")


if __name__ == "__main__":
    main()
