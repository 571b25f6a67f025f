"""`finetune bench`: how fast each method trains, and how much memory it takes, through the real loop.

Every variant (LoRA with and without cached encoders or gradient checkpointing, DreamBooth full and
LoRA, ControlNet) is a recipe run by `finetune.trainer.train` in a fresh Python process, so one
variant's peak memory never includes another's. The trainer reports the end of each optimizer step
(`train(..., on_step=...)`); the first `warmup` steps (allocation, caches filling, lazy kernels) are
not timed, the next `steps` are, and one more step runs under `torch.utils.flop_counter.FlopCounterMode`
to count the FLOPs of one training step (forward, backward; the optimizer's elementwise work is not
counted). Model loading, data checks and the final save are outside the timed window.

- seconds per step: wall time of the measured steps / steps (data loading included, it is in the loop);
  with `--repeat N` each variant runs N times, each in a fresh process, and the median run is kept;
- CPU seconds per step: CPU time of all the process's threads over the same steps. On a shared CPU it
  tells waiting from working: with one thread it stays close to an idle machine's wall time;
- images per second: images the UNet sees per step / seconds per step (DreamBooth with prior
  preservation trains batch/2 instance images plus as many class images, so every row sees `batch`);
- peak memory: on CPU the process's maximum resident set size (`getrusage` ru_maxrss: weights,
  activations, optimizer state, the Python/torch runtime); on CUDA `torch.cuda.max_memory_allocated`;
- FLOPs utilisation (CUDA): counted FLOPs per step / seconds per step / the GPU's dense peak for the
  precision the matmuls run in (`PEAK_TFLOPS`; override with `--peak-tflops`). With gradient
  checkpointing the count includes the recomputed forward, so that row is hardware, not model, FLOPs.

Presets: the tiny-model presets (`finetune.tiny_model.PRESETS`, `medium` keeps SD1.5's block pattern at
~19M UNet parameters), and `sd15`: SD1.5's exact architecture (860M UNet, 123M CLIP text encoder, 84M VAE)
with random weights at 512 px, for a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from finetune.errors import FinetuneError

# ---------------------------------------------------------------------------------------------------
# Variants: a name, what it is, and its recipe


@dataclass(frozen=True)
class Variant:
    description: str
    build: Callable[[dict, "BenchSettings"], dict]  # (common recipe, settings) -> recipe dict


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
    "dreambooth": Variant("DreamBooth, full UNet, prior preservation, 8-bit AdamW", lambda c, s: _dreambooth(c, s, "full")),
    "dreambooth_lora": Variant("DreamBooth with a LoRA adapter, prior preservation", lambda c, s: _dreambooth(c, s, "lora")),
    "controlnet": Variant("ControlNet (trainable encoder copy), frozen UNet", lambda c, s: _controlnet(c, s)),
}


def dreambooth_instances(batch: int) -> int:
    return max(1, batch // 2)


def images_per_step(name: str, batch: int) -> int:
    return 2 * dreambooth_instances(batch) if name.startswith("dreambooth") else batch


# ---------------------------------------------------------------------------------------------------
# Peak FLOP/s of the GPUs we know (dense, no sparsity; NVIDIA data sheets), by precision


PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    # Matched in order against torch.cuda.get_device_name(); the first substring found wins.
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM, same tensor cores as H100 SXM
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of `device_name` for `precision` (bf16, fp16, tf32, fp32), or None if unknown."""
    for pattern, peaks in PEAK_TFLOPS:
        if pattern.lower() in device_name.lower():
            return peaks.get(precision)
    return None


# ---------------------------------------------------------------------------------------------------
# SD1.5's architecture with random weights

SD15_UNET_CHANNELS = (320, 640, 1280, 1280)
SD15_VAE_CHANNELS = (128, 256, 512, 512)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=49408)


def build_sd15_pipeline(width_divisor: int = 1, seed: int = 0, device: str | None = None):
    """A StableDiffusionPipeline with SD1.5's architecture and random weights (nothing is downloaded).

    UNet: diffusers' default UNet2DConditionModel (SD1.5's config) with cross_attention_dim 768; VAE:
    SD's KL-f8 autoencoder; text encoder: CLIP ViT-L/14's text tower (12 layers, 768 wide, 49408 tokens),
    read with the project's generated tokenizer. `width_divisor` divides every width (8 builds a
    ~1/64-size copy for tests); `device="meta"` builds it without allocating weights.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from finetune.tiny_model import DEFAULT_WORDS, assemble_pipeline
    from finetune.tokenizer import make_clip_tokenizer

    if 32 % width_divisor:
        raise ValueError(f"width_divisor must divide 32 (the norm groups), got {width_divisor}")
    scale = lambda channels: tuple(c // width_divisor for c in channels)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = make_clip_tokenizer(DEFAULT_WORDS, Path(scratch))
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=scale(SD15_UNET_CHANNELS),
            cross_attention_dim=768 // width_divisor,
            attention_head_dim=8,
            norm_num_groups=32 // width_divisor,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=scale(SD15_VAE_CHANNELS),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32 // width_divisor,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=SD15_TEXT["vocab_size"],
                hidden_size=SD15_TEXT["hidden_size"] // width_divisor,
                intermediate_size=SD15_TEXT["intermediate_size"] // width_divisor,
                num_hidden_layers=SD15_TEXT["num_hidden_layers"],
                num_attention_heads=SD15_TEXT["num_attention_heads"],
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                projection_dim=SD15_TEXT["hidden_size"] // width_divisor,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    return assemble_pipeline(vae, text_encoder, tokenizer, unet)


# ---------------------------------------------------------------------------------------------------
# The parent: model, data, one subprocess per variant, table and JSON


@dataclass
class BenchSettings:
    preset: str
    steps: int
    warmup: int
    batch: int
    resolution: int
    mixed_precision: str
    num_images: int
    count_flops: bool
    peak_tflops: float | None
    data_dir: Path = Path()
    class_dir: Path = Path()


def default_resolution(preset: str) -> int:
    from finetune.tiny_model import PRESETS

    return 512 if preset == "sd15" else PRESETS[preset].resolution


def parse_variants(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names:
        raise FinetuneError(f"--recipes: unknown variant {', '.join(unknown) or '(none given)'}; choose from {','.join(VARIANTS)}")
    return names


def common_recipe(settings: BenchSettings, model: str, output_dir: Path) -> dict:
    return {
        "seed": 0,
        "output_dir": str(output_dir),
        "model": {"pretrained": model},
        # Center crops and no flips: one view per image, so the cached variant's cache is full after one epoch.
        "data": {"image_dir": str(settings.data_dir), "resolution": settings.resolution, "crop": "center", "random_flip": False},
        "train": {
            "batch_size": settings.batch,
            "max_steps": settings.warmup + settings.steps + (1 if settings.count_flops else 0),
            "mixed_precision": settings.mixed_precision,
            "max_grad_norm": 1.0,
        },
        "optimizer": {"name": "adamw", "lr": 1.0e-4, "scheduler": "constant"},
        "validation": {"prompts": [], "at_start": False},
        "checkpoint": {"every_n_steps": 0},
        "logging": {"tensorboard": False},
    }


def run_benchmark(
    preset: str = "medium",
    steps: int = 10,
    warmup: int = 2,
    variants: list[str] | None = None,
    out: Path | None = None,
    base: str | None = None,
    resolution: int | None = None,
    batch: int = 4,
    mixed_precision: str = "no",
    num_images: int = 8,
    repeat: int = 1,
    count_flops: bool = True,
    peak: float | None = None,
    workdir: Path | None = None,
    command: str = "",
    log: Callable[[str], None] = print,
) -> dict:
    """Build the model and data, run each variant in its own process, and return (and write) the report."""
    variants = variants or list(VARIANTS)
    if steps < 1 or warmup < 1:
        raise FinetuneError("--steps and --warmup must be at least 1 (the first step's end starts the clock)")
    if repeat < 1:
        raise FinetuneError("--repeat must be at least 1")
    if batch < 1 or num_images < batch:
        raise FinetuneError(f"--batch must be at least 1 and at most --num-images ({num_images})")
    import torch

    if preset == "sd15" and not torch.cuda.is_available() and base is None:
        raise FinetuneError("--preset sd15 (an 860M-parameter UNet at 512 px) needs a CUDA GPU; on a CPU use --preset medium")
    resolution = resolution or default_resolution(preset)
    if resolution % 8:
        raise FinetuneError(f"--resolution must be a multiple of 8, got {resolution}")
    settings = BenchSettings(preset, steps, warmup, batch, resolution, mixed_precision, num_images, count_flops, peak)
    load_at_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None

    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as scratch:
        root = Path(workdir) if workdir else Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        model = base or str(prepare_model(preset, root / "model", log))
        settings.data_dir, settings.class_dir = prepare_data(root, num_images, resolution)
        rows = []
        for name in variants:
            log(f"{name}: {VARIANTS[name].description} ...")
            recipe = VARIANTS[name].build(common_recipe(settings, model, root / "runs" / name), settings)
            runs = [run_variant_process(name, recipe, settings, root / "runs" / f"{name}.json") for _ in range(repeat)]
            row = median_run(runs)
            rows.append(row)
            log(f"{name}: " + (f"{row['sec_per_step']:.3f} s/step, {row['images_per_sec']:.2f} images/s" if "error" not in row else f"failed: {row['error']}"))

    report = {
        "command": command,
        "date": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
        "machine": {**machine_info(rows), "load_average_1min_start": load_at_start},
        "settings": {
            "preset": preset,
            "base": base,
            "resolution": resolution,
            "batch": batch,
            "steps": steps,
            "warmup": warmup,
            "mixed_precision": mixed_precision,
            "num_images": num_images,
            "repeat": repeat,
            "count_flops": count_flops,
        },
        "results": rows,
    }
    add_speedups(report["results"])
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def prepare_model(preset: str, folder: Path, log: Callable[[str], None]) -> Path:
    if (folder / "model_index.json").is_file():
        return folder
    if preset == "sd15":
        log("building SD1.5's architecture with random weights (UNet 860M, text encoder 123M, VAE 84M) ...")
        import torch

        # Random init of ~1.07B weights is much faster on the GPU; the files are the same either way.
        build_sd15_pipeline(device="cuda" if torch.cuda.is_available() else None).save_pretrained(folder, safe_serialization=True)
        return folder
    from finetune.tiny_model import PRESETS, make_tiny_model

    if preset not in PRESETS:
        raise FinetuneError(f"--preset {preset}: choose one of {', '.join([*PRESETS, 'sd15'])}")
    return make_tiny_model(folder, preset=preset, seed=0)


def prepare_data(root: Path, num_images: int, resolution: int) -> tuple[Path, Path]:
    """Toy-world images at the resolution: instances (with ControlNet conditioning masks) and class images."""
    from finetune.toyworld.world import write_folder

    data = write_folder(root / "data", num_images, seed=0, size=resolution, conditioning=True)
    classes = write_folder(root / "class", num_images, seed=1, size=resolution, metadata=False)
    return data, classes


def run_variant_process(name: str, recipe: dict, settings: BenchSettings, result_path: Path) -> dict:
    """Run one variant in a fresh interpreter (its own peak memory) and read back its measurements."""
    result_path.parent.mkdir(parents=True, exist_ok=True)
    spec = {
        "name": name,
        "recipe": recipe,
        "warmup": settings.warmup,
        "steps": settings.steps,
        "count_flops": settings.count_flops,
        "peak_tflops": settings.peak_tflops,
        "images_per_step": images_per_step(name, settings.batch),
    }
    spec_path = result_path.with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.run(
        [sys.executable, "-m", "finetune.bench", "--worker", str(spec_path), str(result_path)],
        capture_output=True,
        text=True,
        env=env,
    )
    row = {"variant": name, "description": VARIANTS[name].description}
    if process.returncode != 0 or not result_path.is_file():
        tail = [line for line in (process.stderr or process.stdout).strip().splitlines() if line.strip()][-1:]
        row["error"] = f"exit {process.returncode}: {tail[0] if tail else 'no output'}"
        return row
    row.update(json.loads(result_path.read_text()))
    return row


def median_run(runs: list[dict]) -> dict:
    """Of several fresh-process runs of one variant, the one with the median seconds per step (a failure wins)."""
    failed = [run for run in runs if "error" in run]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda run: run["sec_per_step"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    if len(runs) > 1:
        chosen["runs_sec_per_step"] = [run["sec_per_step"] for run in runs]
    return chosen


def add_speedups(rows: list[dict]) -> None:
    """`speedup_vs_lora`: the plain LoRA row's seconds per step / this row's."""
    reference = next((row for row in rows if row["variant"] == "lora" and "error" not in row), None)
    for row in rows:
        if reference is not None and "error" not in row:
            row["speedup_vs_lora"] = round(reference["sec_per_step"] / row["sec_per_step"], 3)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(rows: list[dict]) -> dict:
    import diffusers
    import torch

    measured = next((row for row in rows if "error" not in row), {})
    return {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": measured.get("torch_threads"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,  # at the end
        "memory_gb": _total_memory_gb(),
        "device": measured.get("device", "cuda" if torch.cuda.is_available() else "cpu"),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _total_memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


COLUMNS = ("variant", "s/step", "CPU s/step", "images/s", "vs lora", "peak MB", "GFLOP/step", "TFLOP/s", "MFU")


def row_cells(row: dict) -> list[str]:
    """One result row as the table's cells ("-" where a number does not apply)."""
    if "error" in row:
        return [row["variant"], "failed", row["error"], *[""] * (len(COLUMNS) - 3)]
    flops, speedup, mfu = row.get("flops_per_step"), row.get("speedup_vs_lora"), row.get("mfu")
    return [
        row["variant"],
        f"{row['sec_per_step']:.3f}",
        f"{row['cpu_sec_per_step']:.3f}",
        f"{row['images_per_sec']:.2f}",
        f"{speedup:.2f}x" if speedup else "-",
        f"{row['peak_memory_mb']:.0f}",
        f"{flops / 1e9:.1f}" if flops else "-",
        f"{row['achieved_tflops']:.3f}" if flops else "-",
        f"{100 * mfu:.1f}%" if mfu is not None else "-",
    ]


def memory_label(report: dict) -> str:
    on_gpu = any(row.get("memory_kind") == "cuda max allocated" for row in report["results"])
    return "peak MB (cuda max allocated)" if on_gpu else "peak MB (max RSS)"


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    settings, machine = report["settings"], report["machine"]
    title = (
        f"finetune bench: {settings['preset']} at {settings['resolution']} px, batch {settings['batch']}, "
        f"{settings['steps']} steps after {settings['warmup']} warmup, precision {settings['mixed_precision']}"
    )
    caption = f"{machine['device']} | {machine['cpu']} | torch {machine['torch']}, {machine['torch_threads']} threads | {memory_label(report)}"
    table = Table(title=title, caption=caption)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "variant" else "right", no_wrap=True)
    for row in report["results"]:
        table.add_row(*row_cells(row), style="red" if "error" in row else None)
    console = Console()
    (console if console.is_terminal else Console(width=120)).print(table)


def markdown_table(report: dict) -> str:
    """The results as a Markdown table (as in docs/benchmarks.md)."""
    header = [memory_label(report) if column == "peak MB" else column for column in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(row_cells(row)) + " |" for row in report["results"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# The worker: one variant, in its own process


def _max_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def measure(spec: dict) -> dict:
    """Train the spec's recipe, timing steps warmup+1 .. warmup+steps; count FLOPs of one more step."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from finetune.config import recipe_from_dict
    from finetune.trainer import train

    recipe = recipe_from_dict(spec["recipe"], source=f"bench variant {spec['name']}")
    warmup, steps = spec["warmup"], spec["steps"]
    cuda = torch.cuda.is_available()
    marks: dict = {"ends": []}
    baseline = torch.cuda.memory_allocated() / 2**20 if cuda else _max_rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def on_step(step: int) -> None:
        if cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if warmup <= step <= warmup + steps:
            marks["ends"].append(now)
        if step == warmup:
            marks["start"], marks["cpu_start"] = now, time.process_time()
        elif step == warmup + steps:
            marks["end"], marks["cpu_end"] = now, time.process_time()
            marks["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else _max_rss_mb()
            if spec["count_flops"]:
                marks["counter"] = FlopCounterMode(display=False)
                marks["counter"].__enter__()
        elif step == warmup + steps + 1 and "counter" in marks:
            marks["counter"].__exit__(None, None, None)
            marks["flops"] = marks.pop("counter").get_total_flops()

    result = train(recipe, on_step=on_step)
    sec_per_step = (marks["end"] - marks["start"]) / steps
    step_seconds = [round(b - a, 6) for a, b in zip(marks["ends"], marks["ends"][1:])]
    row = {
        "method": recipe.method,
        "sec_per_step": sec_per_step,
        # Each measured step's seconds: a spike is another process taking the CPU (compare the median).
        "step_seconds": step_seconds,
        "sec_per_step_median": statistics.median(step_seconds),
        "images_per_step": spec["images_per_step"],
        "images_per_sec": spec["images_per_step"] / sec_per_step,
        "peak_memory_mb": marks["peak_mb"],
        "baseline_memory_mb": baseline,
        "memory_kind": "cuda max allocated" if cuda else "max RSS",
        # CPU seconds of all this process's threads: per step, and per wall second (well under the thread
        # count: the process waited, for other processes on a shared machine or for a GPU). With one thread
        # on a busy CPU, CPU seconds per step are close to the wall time the step takes on an idle one.
        "cpu_sec_per_step": (marks["cpu_end"] - marks["cpu_start"]) / steps,
        "cpu_busy": (marks["cpu_end"] - marks["cpu_start"]) / (marks["end"] - marks["start"]),
        "final_loss": result.losses[warmup + steps - 1],
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
    }
    if "flops" in marks:
        row["flops_per_step"] = marks["flops"]
        row["achieved_tflops"] = marks["flops"] / sec_per_step / 1e12
        if cuda:
            mp = recipe.train.mixed_precision
            precision = mp if mp != "no" else ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
            peak = spec.get("peak_tflops") or peak_tflops(row["device"], precision)
            row["precision"], row["peak_tflops"] = precision, peak
            row["mfu"] = row["achieved_tflops"] / peak if peak else None
    return row


def _worker(argv: list[str]) -> int:
    spec_path, result_path = argv
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    row = measure(json.loads(Path(spec_path).read_text()))
    Path(result_path).write_text(json.dumps(row))
    return 0


# ---------------------------------------------------------------------------------------------------
# The command line


BENCH_EXAMPLES = """examples:
  finetune bench                                          # medium preset, 64 px, batch 4, every variant
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
        "CPU, max allocated on CUDA) and FLOPs per step with, on a known GPU, the utilisation of its peak. Prints a table "
        "and writes JSON with the machine, the command and the date. See docs/benchmarks.md.",
        epilog=BENCH_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=["tiny", "world", "medium", "sd15"], default="medium",
                   help="model to build: a tiny-model preset (medium: SD1.5's block pattern, ~19M UNet parameters), or sd15 "
                   "(SD1.5's architecture with random weights, 512 px; needs a GPU)")
    p.add_argument("--base", help="benchmark this base model instead of building one (diffusers folder, hub id, .safetensors)")
    p.add_argument("--steps", type=int, default=10, help="measured steps per variant (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default 2; fills lora_cached's cache)")
    p.add_argument("--batch", type=int, default=4, help="images per step (default 4)")
    p.add_argument("--resolution", type=int, help="image size in pixels (default: the preset's; 64 for medium, 512 for sd15)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="train.mixed_precision (default no)")
    p.add_argument("--num-images", type=int, default=8, help="images in the generated dataset (default 8)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs of each variant, each in a fresh process; the report keeps the median run (default 1)")
    p.add_argument("--recipes", default=",".join(VARIANTS), help=f"comma-separated variants (default all: {','.join(VARIANTS)})")
    p.add_argument("--no-flops", action="store_true", help="skip the extra step that counts FLOPs")
    p.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s for MFU (default: looked up for H100/H200/A100)")
    p.add_argument("--workdir", help="keep the model, data and runs here (default: a temporary folder)")
    p.add_argument("--out", default="outputs/bench.json", help="JSON report (default outputs/bench.json)")
    return p


def format_command(args) -> str:
    """The command line with every option spelled out, to repeat a run exactly."""
    parts = ["finetune", "bench", "--preset", args.preset]
    if args.base:
        parts += ["--base", args.base]
    parts += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
    parts += ["--resolution", str(args.resolution or default_resolution(args.preset))]
    parts += ["--mixed-precision", args.mixed_precision, "--num-images", str(args.num_images), "--repeat", str(args.repeat)]
    parts += ["--recipes", args.recipes]
    if args.no_flops:
        parts.append("--no-flops")
    if args.peak_tflops:
        parts += ["--peak-tflops", str(args.peak_tflops)]
    return shlex.join(parts + ["--out", str(args.out)])


def run_bench_command(args) -> int:
    """`finetune bench`: run, print the table, write the report; exit 1 if a variant failed."""
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


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2:]))
    sys.exit("usage: finetune bench ... (this module's --worker entry is internal)")
