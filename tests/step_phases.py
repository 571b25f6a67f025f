"""The operators of one training step by phase: the UNet's forward and its backward, the loss, clipping, the optimizer,
the weight average and the loop's own work (`python tests/step_phases.py` prints the bench's cached LoRA step, as
docs/benchmarks-gpu.md gives it). Each operator that is neither a view nor an allocation is a kernel launch on a GPU;
those cost the host's dispatch alone. A backward operator counts for the phase of the forward line that made it (autograd's anomaly mode
records that line; without its NaN checks, which would add operators)."""

from __future__ import annotations

import collections
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# (file, function, phase): an operator belongs to the innermost of these functions it runs in.
PHASES = [
    ("accelerate/accelerator.py", "backward", "backward call"),
    ("finetune/training/step_losses.py", "backward", "backward call"),
    ("accelerate/accelerator.py", "clip_grad_norm_", "clipping"),
    ("finetune/optim/optimizers.py", "clip_gradients", "clipping"),
    ("accelerate/optimizer.py", "step", "optimizer step"),
    ("accelerate/optimizer.py", "zero_grad", "zero_grad"),
    ("accelerate/scheduler.py", "step", "lr schedule"),
    ("finetune/training/ema.py", "update", "weight average"),
    ("finetune/methods/base.py", "predict", "UNet"),
    ("finetune/methods/lora.py", "hold_weight_limits", "lora.max_norm"),
    ("finetune/methods/base.py", "encode_latents", "cached latents"),
    ("finetune/methods/base.py", "encode_text", "cached text states"),
    ("finetune/training/diffusion.py", "draw_noise", "noise and timestep draws"),
    ("finetune/training/diffusion.py", "draw_perturbation", "noise and timestep draws"),
    ("finetune/training/diffusion.py", "normal", "noise and timestep draws"),
    ("finetune/training/diffusion.py", "add_noise", "noising"),
    ("finetune/training/diffusion.py", "per_sample_loss", "loss and its weighting"),
    ("finetune/methods/base.py", "combine_losses", "loss and its weighting"),
    ("finetune/training/device_copy.py", "to_device", "device copies"),
    ("finetune/training/step_losses.py", "add", "running losses"),
    ("finetune/training/step_losses.py", "end_step", "running losses"),
    ("finetune/training/step_losses.py", "weighted", "running losses"),
]
LOOP = "the loop's other work"
# Not kernels: a view without autograd's aliasing, and allocations (on a GPU the caching allocator's, no launch).
ALLOCATIONS = {torch.ops.aten._unsafe_view, torch.ops.aten.empty_like, torch.ops.aten.empty, torch.ops.aten.empty_strided}


def phase_of_frames(frames: list[tuple[str, str]]) -> str:
    """`frames`: (file, function) from the outermost call in."""
    for filename, function in reversed(frames):
        for file, name, phase in PHASES:
            if function == name and filename.replace("\\", "/").endswith(file):
                return phase
    return LOOP


def current_frames() -> list[tuple[str, str]]:
    frames, frame = [], sys._getframe(2)
    while frame is not None:
        frames.append((frame.f_code.co_filename, frame.f_code.co_name))
        frame = frame.f_back
    return frames[::-1]


def recorded_frames(node) -> list[tuple[str, str]]:
    """The forward's stack that anomaly mode kept with a backward node."""
    recorded = node.metadata.get("traceback_", "")
    lines = [line.strip() for line in ("".join(recorded) if isinstance(recorded, list) else recorded).splitlines()]
    return [(line.split('"')[1], line.rsplit(" in ", 1)[-1]) for line in lines if line.startswith("File ")]


class StepPhases(TorchDispatchMode):
    """`kernels[phase]` and `operators[phase]`: Counters by operator (a backward one under "backward of PHASE")."""

    def __init__(self):
        super().__init__()
        self.kernels = collections.defaultdict(collections.Counter)
        self.operators = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "profiler" in str(func):
            return out
        node = torch._C._current_autograd_node()
        phase = f"backward of {phase_of_frames(recorded_frames(node))}" if node is not None else phase_of_frames(current_frames())
        self.operators[phase][func.overloadpacket] += 1
        if not func.is_view and func.overloadpacket not in ALLOCATIONS:
            self.kernels[phase][func.overloadpacket] += 1
        return out


def count_step(recipe, counted_step: int = 2) -> tuple[StepPhases, list[float]]:
    """Train `recipe` (at least `counted_step` steps) and count step `counted_step`, from the end of the one before."""
    from finetune.training.trainer import train

    counting = StepPhases()

    def on_step(step: int) -> None:
        counting.__enter__() if step == counted_step - 1 else counting.__exit__(None, None, None) if step == counted_step else None

    with torch.autograd.set_detect_anomaly(True, check_nan=False):
        result = train(recipe, on_step=on_step, overwrite=True)
    return counting, result.losses


def bench_step(workdir, **train_settings) -> tuple[StepPhases, list[float]]:
    """The 4th step of the bench's cached LoRA (medium preset, batch 4, 64 px, bf16; the cache is full by then)."""
    from pathlib import Path

    from finetune.bench.runner import BenchSettings, common_recipe, prepare_data, prepare_model
    from finetune.bench.variants import VARIANTS
    from finetune.config.recipe_loading import recipe_from_dict

    root = Path(workdir)
    settings = BenchSettings("medium", 2, 2, 4, 64, "bf16", 8, False, None)
    model = str(prepare_model("medium", root / "models" / "medium", print))
    settings.data_dir, settings.class_dir = prepare_data(root, 8, 64)
    recipe = VARIANTS["lora_cached"].build(common_recipe(settings, model, root / "runs" / "lora_cached"), settings)
    recipe["train"].update(max_steps=4, **train_settings)
    return count_step(recipe_from_dict(recipe), counted_step=4)


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="outputs/step-census")
    parser.add_argument("--train", default="{}", help='train: settings as JSON, e.g. \'{"ema_decay": 0.999, "gradient_accumulation_steps": 2}\'')
    args = parser.parse_args()
    counted, losses = bench_step(args.workdir, **json.loads(args.train))
    print(f"losses {losses}")
    print(f"{'phase':40s} {'operators':>9s} {'kernels':>8s}")
    for phase, operators in sorted(counted.operators.items(), key=lambda item: -sum(item[1].values())):
        kernels = counted.kernels[phase]
        detail = "" if phase in ("UNet", "backward of UNet") else "  " + ", ".join(f"{op.__name__} {n}" for op, n in kernels.most_common())
        print(f"{phase:40s} {sum(operators.values()):9d} {sum(kernels.values()):8d}{detail}")
    print(f"{'all':40s} {sum(sum(c.values()) for c in counted.operators.values()):9d} {sum(sum(c.values()) for c in counted.kernels.values()):8d}")


if __name__ == "__main__":
    main()
