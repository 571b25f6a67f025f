"""The parent: settings, model, data, one subprocess per variant, and the report it writes."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from finetune.bench.report import add_speedups, machine_info, median_run
from finetune.bench.sd15 import build_sd15_pipeline
from finetune.bench.variants import DEFAULT_VARIANTS, VARIANTS, images_per_step
from finetune.data.image_bounds import MAX_CLASS_IMAGES, MAX_RESOLUTION, RESOLUTION_BOUND
from finetune.errors import FinetuneError
from finetune.library_noise import quiet_weight_progress_bars
from finetune.outputs.atomic_files import atomic_write_text

# ---------------------------------------------------------------------------------------------------
# The parent: model, data, one subprocess per variant, and the JSON report (the table: report.py)


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


def default_resolution(preset: str, base: str | None = None) -> int:
    """The preset's resolution; with a base model, the base's own (its UNet's sample size times the
    VAE's downsampling; 512, SD1.x's, for a single-file base). A base that is not there is one line."""
    if base is None:
        from finetune.models.tiny_model import PRESETS

        return 512 if preset == "sd15" else PRESETS[preset].resolution
    from finetune.config import ModelConfig
    from finetune.models.model_source import resolve_model_folder

    folder = resolve_model_folder(ModelConfig.from_option(base))
    if folder is None:
        return 512
    unet, vae = (json.loads((folder / part / "config.json").read_text()) for part in ("unet", "vae"))
    return unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)


def parse_variants(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names:
        raise FinetuneError(f"--recipes: unknown variant {', '.join(unknown) or '(none given)'}; choose from {','.join(VARIANTS)}")
    return names


RECIPE_SEED = 0  # every variant's: the data order, and so which images the first steps see


def training_order(num_images: int, batch: int) -> Iterator[list[int]]:
    """The images of each step, in the trainer's order (one process): each epoch's whole batches of a new shuffle."""
    from finetune.data.batches import EpochBatchSampler

    sampler = EpochBatchSampler(num_images, batch, 1, 0, RECIPE_SEED)
    for epoch in itertools.count():
        yield from sampler.epoch_batches(epoch)


def images_seen(num_images: int, batch: int, steps: int) -> int:
    """How many of the images the first `steps` steps train on."""
    return len(set().union(*itertools.islice(training_order(num_images, batch), steps)))


def steps_to_fill_cache(num_images: int, batch: int) -> int:
    """The steps after which every image has been encoded once (and the cached variants only read the cache). An epoch
    trains whole batches and the rest of its images wait for the next epoch's shuffle, so where --batch does not divide
    --num-images this is more than ceil(images / batch), and depends on the order."""
    seen: set[int] = set()
    for steps, images in enumerate(training_order(num_images, batch), 1):
        seen.update(images)
        if len(seen) == num_images:
            return steps
    raise AssertionError("unreachable: the order is endless")


def common_recipe(settings: BenchSettings, model: str, output_dir: Path) -> dict:
    return {
        "seed": RECIPE_SEED,
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
    variants = variants or list(DEFAULT_VARIANTS)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:  # each launched copy would run every variant, whose processes would join the others' as one run
        raise FinetuneError(f"finetune bench runs each variant in one process of its own: run it without accelerate launch or torchrun "
                            f"(WORLD_SIZE is {processes}); its images/s are those of one process")  # fmt: skip
    if steps < 1 or warmup < 1:
        raise FinetuneError("--steps and --warmup must be at least 1 (the first step's end starts the clock)")
    if repeat < 1:
        raise FinetuneError("--repeat must be at least 1")
    if batch < 1 or num_images < batch:
        raise FinetuneError(f"--batch must be at least 1 and at most --num-images ({num_images})")
    cached = [name for name in variants if "cached" in name]
    filled_after = steps_to_fill_cache(num_images, batch) if cached else 0
    if warmup < filled_after:  # the timed steps (and the counted one) would still encode images
        seen = images_seen(num_images, batch, warmup)
        log(f"note: --warmup {warmup} steps of --batch {batch} see {seen} of the {num_images} images: {', '.join(cached)} would time steps "
            f"that still fill the cache; --warmup {filled_after} fills it first")
    dreambooth = [name for name in variants if name.startswith("dreambooth")]
    if dreambooth and num_images > MAX_CLASS_IMAGES:  # their recipes' dreambooth.num_class_images, which the user never set
        raise FinetuneError(f"--num-images {num_images} must be at most {MAX_CLASS_IMAGES:,} with {', '.join(dreambooth)} (as many class images, "
                            "numbered in 5 digits): lower it, or leave those out of --recipes")  # fmt: skip
    if out is not None:
        check_report_out(Path(out))
    if workdir is not None:
        check_runs_are_the_benchs(Path(workdir), variants)
    import torch

    if preset == "sd15" and not torch.cuda.is_available() and base is None:
        raise FinetuneError("--preset sd15 (an 860M-parameter UNet at 512 px) needs a CUDA GPU; on a CPU use --preset medium")
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise FinetuneError("--mixed-precision fp16 needs a GPU; on a CPU use bf16 or no")
    # With a base: checks it is there before any variant starts a process that fails on it.
    base_resolution = default_resolution(preset, base)
    resolution = resolution or base_resolution
    if resolution % 8:
        raise FinetuneError(f"--resolution must be a multiple of 8, got {resolution}")
    if resolution > MAX_RESOLUTION:  # each variant's recipe would refuse it as data.resolution, after the model and data were made
        raise FinetuneError(f"--resolution {resolution} {RESOLUTION_BOUND}")
    settings = BenchSettings(preset, steps, warmup, batch, resolution, mixed_precision, num_images, count_flops, peak)
    load_at_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None

    report = {
        "command": command,
        "date": None,
        "machine": {},
        "settings": {
            "preset": None if base else preset,  # a --base is benchmarked, not the preset
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
        "results": [],
    }

    def finish(rows: list[dict]) -> None:
        """Fill in the report; written after every variant, so a run cut short keeps what it measured."""
        report["date"] = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
        report["machine"] = {**machine_info(rows), "load_average_1min_start": load_at_start}
        report["results"] = rows
        add_speedups(rows)
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(Path(out), json.dumps(report, indent=2) + "\n")  # a stop while it is written keeps the last one

    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as scratch:
        root = Path(workdir) if workdir else Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        model = base or str(prepare_model(preset, root / "models" / preset, log))  # one per preset: a workdir serves several
        settings.data_dir, settings.class_dir = prepare_data(root, num_images, resolution)
        rows = []
        # Written once before the first variant, so that a deadline's SIGTERM in it still leaves a report (command,
        # settings, machine): the stop's SIGKILL (timeout -k 15 in .ci/gpu-check) gives it seconds at most.
        finish(rows)
        for name in variants:
            log(f"{name}: {VARIANTS[name].description} ...")
            recipe = VARIANTS[name].build(common_recipe(settings, model, root / "runs" / name), settings)
            try:
                runs = [run_variant_process(name, recipe, settings, root / "runs" / f"{name}.json") for _ in range(repeat)]
            except VariantStopped as stop:  # Ctrl-C or SIGTERM (a deadline): the report says how far the variant got
                rows.append(stop.row)
                finish(rows)
                raise stop.stop from None  # as the signal it was: SIGTERM's stop line and 143 (a VariantStopped said Ctrl-C, 130)
            row = median_run(runs)
            rows.append(row)
            log(f"{name}: " + (f"{row['sec_per_step']:.3f} s/step, {row['images_per_sec']:.2f} images/s" if "error" not in row else f"failed: {row['error']}"))
            finish(rows)
    return report


def check_report_out(out: Path) -> None:
    """--out is written after each variant, over what is there: an earlier bench's report (a rerun replaces it), never a
    folder or a file of another kind (`--out mylora.safetensors` wrote the JSON over the LoRA once the first variant ran)."""
    if out.is_dir():
        raise FinetuneError(f"--out {out} is a folder: give the report's file name, e.g. {out / 'bench.json'}")
    if not out.exists():
        return
    try:
        report = json.loads(out.read_text()) if out.stat().st_size < 2**24 else None  # a report is kilobytes
    except (OSError, ValueError):  # not text, not JSON
        report = None
    if not (isinstance(report, dict) and {"command", "settings", "results"} <= report.keys()):
        raise FinetuneError(f"--out {out} is a file the bench did not write (not one of its reports), which the report would replace: give another file name")


def check_runs_are_the_benchs(workdir: Path, variants: list[str]) -> None:
    """Each variant trains in --workdir's runs/<variant> over what an earlier bench left there (--overwrite): never in a
    folder the bench did not make (a run of the user's, `--workdir .` beside their runs/lora), whose checkpoints, samples
    and outputs it replaced. The bench's own has the spec it writes beside it (runs/<variant>.spec.json) before it trains."""
    for name in variants:
        run = workdir / "runs" / name
        if run.exists() and not run.with_name(f"{name}.spec.json").is_file():
            raise FinetuneError(f"--workdir {workdir}: {run} was not made by finetune bench, and its {name} run would replace what it holds: "
                                "give another --workdir (or move that folder)")  # fmt: skip


def prepare_model(preset: str, folder: Path, log: Callable[[str], None]) -> Path:
    if (folder / "model_index.json").is_file():
        return folder
    quiet_weight_progress_bars()  # transformers' "Writing model shards" bar as the text encoder is saved, between the bench's lines
    if preset == "sd15":
        log("building SD1.5's architecture with random weights (UNet 860M, text encoder 123M, VAE 84M) ...")
        import torch

        # Random init of ~1.07B weights is much faster on the GPU; the files are the same either way.
        build_sd15_pipeline(device="cuda" if torch.cuda.is_available() else None).save_pretrained(folder, safe_serialization=True)
        return folder
    from finetune.models.tiny_model import PRESETS, make_tiny_model

    if preset not in PRESETS:
        raise FinetuneError(f"--preset {preset}: choose one of {', '.join([*PRESETS, 'sd15'])}")
    return make_tiny_model(folder, preset=preset, seed=0)


def prepare_data(root: Path, num_images: int, resolution: int) -> tuple[Path, Path]:
    """Toy-world images at the resolution: instances (with ControlNet conditioning masks) and class images, in folders
    named by their count and size. A --workdir serves runs with other settings: `write_folder` adds to a folder and
    removes nothing, so one folder for all let a run of 8 images after one of 32 train 32, a quarter at the new size."""
    from finetune.toyworld.datasets import write_folder

    name = f"{num_images}x{resolution}px"
    data = write_folder(root / "data" / name, num_images, seed=0, size=resolution, conditioning=True)
    classes = write_folder(root / "class" / name, num_images, seed=1, size=resolution, metadata=False)
    return data, classes


class VariantStopped(KeyboardInterrupt):
    """A variant's run stopped from outside; `row` is its report row, the error saying how far it got, and `stop` the stop
    itself (Ctrl-C's KeyboardInterrupt, SIGTERM's Terminated), raised again once the row is in the report."""

    def __init__(self, row: dict, stop: KeyboardInterrupt):
        super().__init__()
        self.row, self.stop = row, stop


def stopped_error(seconds: float, progress: Path, warmup: int) -> str:
    """How far a stopped variant got: the ends of its untimed steps, from its process's start."""
    ends = [line.split() for line in progress.read_text().splitlines()] if progress.is_file() else []
    if not ends:
        return f"stopped after {seconds:.0f} s, before its first step ended (loading the model, or that step: compiling)"
    steps = ", ".join(f"step {step} at {at} s" for step, at in ends)
    return f"stopped after {seconds:.0f} s, {len(ends)} of {warmup} untimed steps done ({steps}, from the process's start)"


def with_check_of_unfinished(row: dict, spec: dict) -> dict:
    """A compiled variant that stopped or failed after its compile and gradient check: the check, which says whether its
    compile computes the right thing (what a deadline cutting SD1.5's timed steps leaves); else its error says none ran."""
    try:
        row["compiled_check"] = json.loads(Path(spec["check_file"]).read_text())
    except (OSError, ValueError):  # none written (or cut while written)
        if spec["check_compiled"]:
            row["error"] += "; its gradients not checked"
    return row


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
        "cudnn_benchmark": VARIANTS[name].cudnn_benchmark,
        "progress": str(result_path.with_suffix(".progress")),
        # A compiled variant compares its gradients with eager's after its first step (finetune.bench.compiled_check).
        "check_compiled": VARIANTS[name].compiles,
        "check_file": str(result_path.with_suffix(".check.json")),
    }
    spec_path = result_path.with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    for earlier in (result_path, Path(spec["progress"]), Path(spec["check_file"])):
        earlier.unlink(missing_ok=True)
    # torch.compile is the variant's to set: one exported in this shell (or by `accelerate launch --dynamo_backend`) compiled
    # every variant, the eager rows too.
    inherited = {key: value for key, value in os.environ.items() if not key.startswith("ACCELERATE_DYNAMO_")}
    env = {**inherited, "TOKENIZERS_PARALLELISM": "false", **VARIANTS[name].environment}
    row = {"variant": name, "description": VARIANTS[name].description, "environment": VARIANTS[name].environment}
    started = time.monotonic()
    try:
        process = subprocess.run(
            [sys.executable, "-m", "finetune.bench", "--worker", str(spec_path), str(result_path)],
            capture_output=True,
            text=True,
            env=env,
        )
    except KeyboardInterrupt as stop:
        row["error"] = stopped_error(time.monotonic() - started, Path(spec["progress"]), settings.warmup)
        raise VariantStopped(with_check_of_unfinished(row, spec), stop) from None
    if process.returncode != 0 or not result_path.is_file():
        tail = [line for line in (process.stderr or process.stdout).strip().splitlines() if line.strip()][-1:]
        row["error"] = f"exit {process.returncode}: {tail[0] if tail else 'no output'}"
        return with_check_of_unfinished(row, spec)
    row.update(json.loads(result_path.read_text()))
    return row
