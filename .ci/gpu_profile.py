"""Where a training step's time goes on a GPU: torch.profiler over a few steps of one bench variant.

Run by .ci/gpu-profile on the device machine: `python .ci/gpu_profile.py MODEL_DIR WORKDIR OUT_TXT [batch] [variant]`.
Prints the GPU's kernel time per step beside the step's wall time (a step far longer than its kernels
is bound by the CPU issuing them), and the ops that take the most CPU and GPU time. The variant runs as
`finetune bench` runs it: its environment (torch.compile through accelerate) and cuDNN's autotuner.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from finetune.bench.runner import BenchSettings, common_recipe, default_resolution, parse_variants, prepare_data
from finetune.bench.variants import VARIANTS
from finetune.config.recipe_loading import recipe_from_dict
from finetune.training.trainer import train


def main(model: str, workdir: Path, out: Path, batch: int = 4, variant: str = "lora_cached") -> None:
    parse_variants(variant)  # an unknown name is one line naming the known ones
    warmup, profiled = 3, 4
    resolution = default_resolution("sd15", model)  # the model's own: 512 for SD1.5, 64 for the medium preset's dry run
    settings = BenchSettings("profile", profiled, warmup, batch, resolution, "bf16", max(8, batch), False, None)
    settings.data_dir, settings.class_dir = prepare_data(workdir, settings.num_images, resolution)
    recipe_dict = VARIANTS[variant].build(common_recipe(settings, model, workdir / "run"), settings)
    recipe = recipe_from_dict(recipe_dict, source=f"profile {variant}")
    os.environ.update(VARIANTS[variant].environment)  # read when the trainer makes its Accelerator
    torch.backends.cudnn.benchmark = VARIANTS[variant].cudnn_benchmark
    cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    state: dict = {}

    def on_step(step: int) -> None:
        state["last_step"] = step
        # The GPU is waited for at the profiled window's two ends only, as the bench times steps: a wait at every
        # step would keep the CPU from queueing a step while the GPU runs the last one, and read as CPU-bound.
        if cuda and step in (warmup, warmup + profiled):
            torch.cuda.synchronize()
        if step == warmup:
            state["profiler"] = torch.profiler.profile(activities=activities)
            state["profiler"].__enter__()
            state["start"] = time.perf_counter()
        elif step == warmup + profiled:
            state["wall"] = (time.perf_counter() - state["start"]) / profiled
            state["profiler"].__exit__(None, None, None)

    train(recipe, on_step=on_step, overwrite=True)
    if "wall" not in state:  # a deadline's SIGTERM stopped the run at a step boundary before the window's end
        if "profiler" in state:
            state["profiler"].__exit__(None, None, None)
        stopped = f"{variant}: stopped after step {state.get('last_step', 0)} of {warmup} untimed and {profiled} profiled steps: no profile"
        out.write_text(stopped + "\n")
        sys.exit(stopped)
    events = state["profiler"].key_averages()
    # GPU rows without the user annotations (ranges on the GPU's timeline that span kernels already counted),
    # as torch's own table sums its "Self CUDA time total".
    device_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation)
    lines = [
        f"{variant}, batch {batch}, {model} at {resolution} px, bf16, {profiled} profiled steps",
        f"wall per step (under the profiler): {state['wall'] * 1e3:.1f} ms; GPU kernel time per step: {device_us / profiled / 1e3:.1f} ms",
        "",
        "by GPU time:",
        events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=25, max_name_column_width=60),
        "by CPU time:",
        events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60),
    ]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:2]))


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], Path(args[1]), Path(args[2]), *(int(a) if a.isdigit() else a for a in args[3:]))
