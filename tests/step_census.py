"""The operators of one training step of a bench variant, by source: how docs/benchmarks-gpu.md's CPU counts are made.

    PYTHONPATH=. HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python tests/step_census.py lora_cached [controlnet dreambooth ...]
    ... python tests/step_census.py --train-text-encoder lora dreambooth   # the text encoder trains too (LoRA's or DreamBooth's switch)

Builds the bench's medium preset and data in a work folder (`--workdir`, kept between runs), trains the variant's recipe
(batch 4, 64 px, bf16) for 4 steps and counts the 4th (the cached variants' cache is full by then), from the end of the
3rd step to its own end: forward, backward, clipping, optimizer and the loop's own work. Each operator that is not a view
is a kernel launch on a GPU. Printed: the kernels, then those that are not the model's math (casts, copies, multiplies and
divisions by 1, fills) by kind and by the line that made them; a backward operator is named by its forward's line
(autograd's anomaly mode records it; without its NaN checks, which would add operators)."""

from __future__ import annotations

import argparse
import collections
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

LIBRARIES = ("finetune/", "diffusers/", "peft/", "accelerate/", "transformers/", "bitsandbytes/")


def source_line(frames: list[str]) -> str:
    """The innermost line of a file of ours or of a library the trainer calls (not torch's own)."""
    for frame in reversed(frames):
        for library in LIBRARIES:
            if library in frame and "site-packages/torch/" not in frame:
                return frame[frame.index(library):]
    return "?"


class StepCensus(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.kernels: list[tuple[str, str, str]] = []  # (kind, source, operator) of each operator that is not a view

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        node = torch._C._current_autograd_node()
        out = func(*args, **(kwargs or {}))
        if func.is_view or func.overloadpacket is torch.ops.aten._unsafe_view or "profiler" in str(func):
            return out
        if node is not None:  # backward: where its forward ran
            recorded = node.metadata.get("traceback_", "")
            frames = [line.strip() for line in ("".join(recorded) if isinstance(recorded, list) else recorded).splitlines() if line.strip().startswith("File")]
            frames = [f"{f.split(chr(34))[1]}:{f.split('line ')[1].split(',')[0]}" for f in frames if "torch/nn/modules/module.py" not in f]
        else:
            frames = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()[:-1] if __file__ not in f.filename]
        self.kernels.append((kind(func, args, node is not None), source_line(frames), str(func.overloadpacket)))
        return out


def kind(func, args, backward: bool) -> str:
    """What a non-math operator is, or "" for the model's (and the optimizer's) own math."""
    name, first = func.overloadpacket.__name__, args[0] if args and isinstance(args[0], torch.Tensor) else None
    suffix = " (backward)" if backward else ""
    if name == "_to_copy" and first is not None:
        return ("activation cast" if first.dim() and first.shape[0] == BATCH else "weight cast") + suffix
    if name in ("clone", "contiguous", "copy_", "new_empty_strided"):
        return "copy" + suffix
    if name in ("mul", "div") and any(not isinstance(a, torch.Tensor) and a == 1 for a in args[1:]):
        return f"{name} by 1" + suffix
    if name in ("zero_", "fill_", "zeros", "zeros_like", "new_zeros", "ones_like", "full", "ones"):
        return "fill" + suffix
    return ""


BATCH = 4


def census(variant: str, root: Path, train_text_encoder: bool = False) -> tuple[list[tuple[str, str, str]], list[float]]:
    from finetune.bench.runner import BenchSettings, common_recipe, prepare_data, prepare_model
    from finetune.bench.variants import VARIANTS
    from finetune.config.recipe_loading import recipe_from_dict
    from finetune.training.trainer import train

    settings = BenchSettings("medium", 2, 2, BATCH, 64, "bf16", 8, False, None)
    model = str(prepare_model("medium", root / "models" / "medium", print))
    settings.data_dir, settings.class_dir = prepare_data(root, 8, 64)
    recipe = VARIANTS[variant].build(common_recipe(settings, model, root / "runs" / variant), settings)
    recipe["train"]["max_steps"] = 4
    if train_text_encoder:  # lora.train_text_encoder (a text-encoder LoRA) or dreambooth.train_text_encoder
        section = recipe["method"]
        recipe[section] = {**recipe.get(section, {}), "train_text_encoder": True}
    counting = StepCensus()

    def on_step(step: int) -> None:
        counting.__enter__() if step == 3 else counting.__exit__(None, None, None) if step == 4 else None

    with torch.autograd.set_detect_anomaly(True, check_nan=False):
        result = train(recipe_from_dict(recipe), on_step=on_step, overwrite=True)
    return counting.kernels, result.losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--workdir", type=Path, default=Path("outputs/step-census"))
    parser.add_argument("--train-text-encoder", action="store_true", help="the text encoder trains too (lora and dreambooth variants)")
    args = parser.parse_args()
    for variant in args.variants:
        kernels, losses = census(variant, args.workdir, args.train_text_encoder)
        print(f"{variant}: {len(kernels)} kernels in step 4; losses {losses}")
        kinds = collections.Counter(k for k, _, _ in kernels if k)
        sources = collections.Counter((k, source) for k, source, _ in kernels if k)
        for name, count in kinds.most_common():
            print(f"{count:6d} {name}")
            for (other, source), n in sources.most_common():
                if other == name and not name.startswith("weight cast"):  # autocast's, one per weight used
                    print(f"{n:12d} {source}")


if __name__ == "__main__":
    main()
