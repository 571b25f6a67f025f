"""`finetune bench`: how fast each method trains, and how much memory it takes, through the real loop.

Every variant (LoRA with and without cached encoders or gradient checkpointing, DreamBooth full and
LoRA, ControlNet) is a recipe run by `finetune.training.trainer.train` in a fresh Python process, so one
variant's peak memory never includes another's. The trainer reports the end of each optimizer step
(`train(..., on_step=...)`); the first `warmup` steps (allocation, caches filling, lazy kernels) are
not timed, the next `steps` are, and one more step runs under `torch.utils.flop_counter.FlopCounterMode`
to count the FLOPs of one training step (forward, backward; the optimizer's elementwise work is not
counted; attention as the model's matmuls: `measure.flop_counter`). A compiled UNet runs that step eagerly
(torch.compile steps aside under a dispatch mode): the count is the model's, the same as uncompiled. Model loading, data checks and the final save are outside the timed window.
A compiled variant checks, after its first step, that its compiled module computes the eager module's gradients on that
step's inputs (`compiled_check`): a compile that computes the wrong thing is no speed-up, and its row says so.

- seconds per step: wall time of the measured steps / steps (data loading included, it is in the loop);
  on CUDA the GPU is waited for at the window's two ends only, not at each step (as the loop itself does not);
  with `--repeat N` each variant runs N times, each in a fresh process, and the median run is kept;
- CPU seconds per step: CPU time of all the process's threads over the same steps. On a shared CPU it
  tells waiting from working: with one thread it stays close to an idle machine's wall time;
- images per second: images the UNet sees per step / seconds per step (DreamBooth with prior
  preservation trains batch/2 instance images plus as many class images, so every row sees `batch`);
- peak memory: on CPU the variant process's own maximum resident set size (Linux's VmHWM, not ru_maxrss, which
  exec keeps from the bench process: weights, activations, optimizer state, the Python/torch runtime); on CUDA
  `torch.cuda.max_memory_allocated`. Twice: the whole run's (loading and warm-up included: what a run needs) and
  the timed steps' own (the count restarted as the window starts: a cached variant's warm-up runs the encoders);
- FLOPs utilisation (CUDA): counted FLOPs per step / seconds per step / the GPU's dense peak for the
  precision the matmuls run in (`PEAK_TFLOPS`; override with `--peak-tflops`). With gradient
  checkpointing the count includes the recomputed forward, so that row is hardware, not model, FLOPs.

Presets: the tiny-model presets (`finetune.models.tiny_model.PRESETS`, `medium` keeps SD1.5's block pattern at
~19M UNet parameters), and `sd15`: SD1.5's exact architecture (860M UNet, 123M CLIP text encoder, 84M VAE)
with random weights at 512 px, for a GPU.

Modules: `variants` (the variants and their recipes), `sd15` (SD1.5's architecture, GPU peak FLOP/s),
`runner` (the parent: model, data, one subprocess per variant, the report), `measure` (the child: one
variant's measurements; `__main__` is its entry), `compiled_check` (a compiled variant's gradients against eager's), `report` (median run, machine, table); this module
is the command line.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from finetune.bench.report import print_table
from finetune.bench.runner import default_resolution, parse_variants, run_benchmark
from finetune.bench.variants import DEFAULT_VARIANTS, VARIANTS

__all__ = ["add_bench_parser", "run_bench_command"]

# ---------------------------------------------------------------------------------------------------
# The command line


BENCH_EXAMPLES = """examples:
  finetune bench                                          # medium preset, 64 px, batch 4, the default variants
  finetune bench --resolution 256 --steps 5 --recipes lora,lora_cached,lora_gc
  finetune bench --preset sd15 --mixed-precision bf16     # SD1.5-size UNet at 512 px, on a GPU
"""


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bench` on the `finetune` subcommand parsers."""
    p = subparsers.add_parser(
        "bench",
        help="time each method (s/step, images/s), its peak memory and FLOP utilisation",
        description="Train each method variant for a few steps through the real training loop, each in a fresh process, "
        "on a generated model and toy-world data; report seconds per step, images per second, peak memory (max RSS on "
        "CPU, max allocated on CUDA; the whole run's and the timed steps' own) and FLOPs per step with, on a known GPU, "
        "the utilisation of its peak. Prints a table "
        "and writes JSON with the machine, the command and the date. See docs/benchmarks.md.",
        epilog=BENCH_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=["tiny", "world", "medium", "sd15"], default="medium",
                   help="model to build: a tiny-model preset (medium: SD1.5's block pattern, ~19M UNet parameters), or sd15 "
                   "(SD1.5's architecture with random weights, 512 px; needs a GPU)")
    p.add_argument("--base", help="benchmark this base model instead of building one (diffusers folder, hub id, .safetensors)")
    p.add_argument("--steps", type=int, default=10, help="measured steps per variant (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default 2; the bench says when the cached variants would still encode images in timed steps)")
    p.add_argument("--batch", type=int, default=4, help="images per step (default 4)")
    p.add_argument("--resolution", type=int, help="image size in pixels (default: the preset's, 64 for medium and 512 for sd15; with --base, the base's own)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="train.mixed_precision (default no)")
    p.add_argument("--num-images", type=int, default=8,
                   help="images in the generated dataset, and class images for the DreamBooth variants (default 8; with those, at most 100,000)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs of each variant, each in a fresh process; the report keeps the median run (default 1)")
    p.add_argument("--recipes", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated variants (default: {', '.join(DEFAULT_VARIANTS)}; also: {', '.join(sorted(set(VARIANTS) - set(DEFAULT_VARIANTS)))})")
    p.add_argument("--no-flops", action="store_true", help="skip the extra step that counts FLOPs")
    p.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU (default: looked up for H100/H200/A100)")
    p.add_argument("--workdir", help="keep the model, data and runs here (default: a temporary folder)")
    p.add_argument("--out", default="outputs/bench.json", help="JSON report (default outputs/bench.json; an earlier report there is replaced, another file refused)")
    return p


def format_command(args) -> str:
    """The command line with every option spelled out, to repeat a run exactly."""
    # With --base the preset is not used: naming it would say the run was of the preset's model.
    parts = ["finetune", "bench"] + (["--base", args.base] if args.base else ["--preset", args.preset])
    parts += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
    parts += ["--resolution", str(args.resolution)]
    parts += ["--mixed-precision", args.mixed_precision, "--num-images", str(args.num_images), "--repeat", str(args.repeat)]
    parts += ["--recipes", args.recipes]
    if args.no_flops:
        parts.append("--no-flops")
    if args.peak_tflops:
        parts += ["--peak-tflops", str(args.peak_tflops)]
    if args.workdir:  # the model and data a run there reuses
        parts += ["--workdir", args.workdir]
    return shlex.join(parts + ["--out", str(args.out)])


def run_bench_command(args) -> int:
    """`finetune bench`: run, print the table, write the report; exit 1 if a variant failed."""
    args.resolution = args.resolution or default_resolution(args.preset, args.base)
    report = run_benchmark(
        preset=args.preset,
        steps=args.steps,
        warmup=args.warmup,
        variants=parse_variants(args.recipes),
        out=Path(args.out),
        base=args.base,
        resolution=args.resolution,
        batch=args.batch,
        mixed_precision=args.mixed_precision,
        num_images=args.num_images,
        repeat=args.repeat,
        count_flops=not args.no_flops,
        peak=args.peak_tflops,
        workdir=Path(args.workdir) if args.workdir else None,
        command=format_command(args),
    )
    print_table(report)
    print(f"wrote {args.out}")
    return 1 if any("error" in row for row in report["results"]) else 0
