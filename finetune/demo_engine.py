"""What the browser demo does, without the browser: find adapters in a folder, render comparisons.

Kept apart from `finetune.demo` (the Gradio page) so it can be tested and reused without a web
server, and so every safety rule lives in one place that the page cannot go around:

- Adapters are found by scanning one folder and are addressed by **name** (their path relative to
  that folder). A request names adapters; `DemoEngine.adapter` looks the name up in the last scan and
  refuses anything else, so no path from the browser ever reaches the file system.
- Only safetensors are read. Pickle files (`.bin`, `.ckpt`, `.pt`, `.pth`) found while scanning are
  listed as refused, with the reason, and never loaded (unpickling can run code).
- LoRAs are applied by adding their updates into the weights for one column and copying the saved
  originals back afterwards: the same arithmetic as `finetune merge` (our neutral `LoRA` form, so
  kohya and diffusers files behave the same and alpha != rank keeps its strength), exact to the bit
  when removed, and several LoRAs at different strengths need no adapter bookkeeping in peft.
- Every adapter is checked against the model's shapes before anything renders, so a LoRA or
  ControlNet trained on another base is one readable sentence, not a stack trace.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml
from PIL import Image, ImageOps
from safetensors import safe_open

from finetune.checkpoint import CHECKPOINT_PATTERN, STATE_FILE
from finetune.config import ModelConfig
from finetune.errors import FinetuneError
from finetune.inference import controlnet_metadata
from finetune.kohya import LoRA, finetune_metadata_from_kohya, load_lora
from finetune.merge import find_module
from finetune.methods.controlnet import CONTROLNET_DIR, METADATA_FILE, UNET_DIR
from finetune.methods.full import PIPELINE_DIR
from finetune.methods.lora import LORA_WEIGHTS_NAME
from finetune.models import BaseModel, freeze, load_base_model
from finetune.sampling import build_pipeline, follow_adapters_prediction_type, generate

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# Folders the trainer writes that hold no finished adapter (logs, sample grids).
SKIPPED_FOLDERS = {"logs", "samples", "sample", "__pycache__", "node_modules"}
# What a checkpoint holds besides its resumable state (checkpoint.save_outputs): the run's outputs at its step.
CHECKPOINT_OUTPUTS = {LORA_WEIGHTS_NAME, CONTROLNET_DIR, UNET_DIR, PIPELINE_DIR}
MAX_SCAN_DEPTH = 6
BASE = "(base model)"
CONDITIONING_KINDS = ("as uploaded", "canny", "luminance", "mask")
MAX_INPUT_PIXELS = 4096 * 4096
CACHE_SIZE = {"lora": 8, "controlnet": 2, "pipeline": 1}


@dataclass
class Adapter:
    """One entry of the adapters folder; `refused` says why it cannot be used (it is still listed)."""

    name: str
    kind: str  # "lora", "pipeline" (DreamBooth / full fine-tune) or "controlnet"
    path: Path
    layout: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    refused: str | None = None


# --- scanning ------------------------------------------------------------------------------------


def scan_adapters(root: Path, exclude: tuple[Path, ...] = ()) -> dict[str, Adapter]:
    """Every LoRA file, pipeline folder and ControlNet folder under `root`, by name (sorted)."""
    root = Path(root)
    excluded = {p.resolve() for p in exclude}
    found: list[Adapter] = []
    if not root.is_dir():
        return {}
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        depth = len(here.relative_to(root).parts)
        model = None if here.resolve() in excluded else _model_folder(here, root, files)
        if model is not None or depth >= MAX_SCAN_DEPTH or here.resolve() in excluded:
            dirs.clear()  # the files inside a model folder are its weights, not adapters
            found += [model] if model is not None else []
            continue
        dirs[:] = _folders_to_scan(here, dirs)
        for name in sorted(files):
            if _is_checkpoint(here) and name not in CHECKPOINT_OUTPUTS:
                continue
            path = here / name
            if name.endswith(".safetensors"):
                adapter = _lora_file(path, root)
            elif name.endswith(PICKLE_SUFFIXES):
                adapter = Adapter(_name(path, root), "lora", path, "pickle", refused="pickle checkpoint: only .safetensors files are loaded")
            else:
                continue
            found += [adapter] if adapter is not None else []
    adapters: dict[str, Adapter] = {}
    for adapter in found:
        if adapter.name in adapters or adapter.name == BASE:
            adapter.name = _relative(adapter.path, root)
        adapters[adapter.name] = adapter
    return dict(sorted(adapters.items()))


def _is_checkpoint(folder: Path) -> bool:
    return folder.parent.name == "checkpoints" and CHECKPOINT_PATTERN.match(folder.name) is not None


def _folders_to_scan(here: Path, dirs: list[str]) -> list[str]:
    """A run's checkpoints are listed by their outputs only: the resumable state beside them (optimizer,
    DeepSpeed's pickle shards) is no adapter, nor is a checkpoint still being written."""
    if here.name == "checkpoints":
        return sorted(d for d in dirs if CHECKPOINT_PATTERN.match(d))
    if _is_checkpoint(here):
        return sorted(d for d in dirs if d in CHECKPOINT_OUTPUTS)
    return sorted(d for d in dirs if d not in SKIPPED_FOLDERS and not d.startswith("."))


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _name(path: Path, root: Path) -> str:
    """A training folder's LoRA is named after the folder; other files after their path, no suffix."""
    if path.name.startswith("pytorch_lora_weights.") and path.parent != root:
        return _relative(path.parent, root)
    return _relative(path.with_suffix(""), root)


def _lora_file(path: Path, root: Path) -> Adapter | None:
    """Read only the header (keys, shapes, metadata); a safetensors file without LoRA keys is skipped."""
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            meta = dict(f.metadata() or {})
            downs = [k for k in keys if k.endswith(("lora_down.weight", "lora.down.weight", "lora_A.weight"))]
            rank = str(f.get_slice(downs[0]).get_shape()[0]) if downs else "?"
    except Exception as err:  # noqa: BLE001 - any unreadable file is listed, not raised
        return Adapter(_name(path, root), "lora", path, "?", refused=f"unreadable safetensors file ({err.__class__.__name__})")
    if any(k.startswith(("lora_unet_", "lora_te_")) for k in keys):
        layout = "kohya"
        dim = meta.get("ss_network_dim")  # "Dynamic" for mixed ranks
        meta = finetune_metadata_from_kohya(meta)
        if dim:
            meta.setdefault("finetune.rank", dim)
    elif any(k.startswith(("unet.", "text_encoder.")) for k in keys):
        layout = "diffusers"
    else:
        return None
    meta.setdefault("finetune.rank", rank)
    meta.setdefault("finetune.method", "lora")
    return Adapter(_name(path, root), "lora", path, layout, {k: v for k, v in meta.items() if k.startswith("finetune.")})


def _model_folder(folder: Path, root: Path, files: list[str]) -> Adapter | None:
    if "model_index.json" in files:
        missing = [part for part in ("unet", "vae", "text_encoder") if not list((folder / part).glob("*.safetensors"))]
        refused = f"{', '.join(missing)} weights are not .safetensors (pickle checkpoints are not loaded)" if missing else None
        return Adapter(_relative(folder, root), "pipeline", folder, "diffusers", _folder_metadata(folder), refused)
    if "config.json" in files:
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(config, dict) or config.get("_class_name") != "ControlNetModel":
            return None
        has_weights = (folder / "diffusion_pytorch_model.safetensors").is_file()
        refused = None if has_weights else "no diffusion_pytorch_model.safetensors (pickle checkpoints are not loaded)"
        return Adapter(_relative(folder, root), "controlnet", folder, "diffusers", _folder_metadata(folder), refused)
    return None


def _folder_metadata(folder: Path) -> dict[str, str]:
    """A ControlNet's finetune_metadata.json or, for a saved pipeline, the training run's recipe.yaml (a
    checkpoint's: the recipe and step in its state)."""
    if (folder / METADATA_FILE).is_file():
        return controlnet_metadata(folder)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        state = json.loads((folder.parent / STATE_FILE).read_text())
        return {"finetune.method": str(state["recipe"]["method"]), "finetune.base_model": str(state["recipe"]["model.pretrained"]),
                "finetune.steps": str(state["step"])}
    with contextlib.suppress(OSError, ValueError, AttributeError):
        recipe = yaml.safe_load((folder.parent / "recipe.yaml").read_text())
        return {"finetune.method": str(recipe.get("method", "?")), "finetune.base_model": str(recipe["model"]["pretrained"]),
                "finetune.steps": str(recipe["train"]["max_steps"])}
    return {}


# --- rendering -----------------------------------------------------------------------------------


@dataclass
class Request:
    """One comparison: columns = [base alone] + [adapters at each strength], rows = seeds."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 7.5
    size: int = 64
    model: str = BASE
    loras: list[tuple[str, float]] = field(default_factory=list)
    controlnet: str | None = None
    conditioning_image: Image.Image | None = None
    conditioning_kind: str = "as uploaded"
    conditioning_scale: float = 1.0
    strengths: list[float] = field(default_factory=lambda: [1.0])
    include_base: bool = True
    rows: int = 1


def parse_strengths(text: str) -> list[float]:
    try:
        values = [float(v) for v in str(text).replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise FinetuneError(f"strengths '{text}' must be numbers separated by commas, e.g. 0.5, 1.0") from None
    if not values or len(values) > 6 or any(abs(v) > 4 for v in values):
        raise FinetuneError("give 1 to 6 strengths between -4 and 4, e.g. 0.5, 1.0")
    return values


class DemoEngine:
    """Holds the base model and the last scan; renders `Request`s (one at a time, under a lock)."""

    def __init__(self, base: str, adapters_dir: Path, exclude: tuple[Path, ...] = (), base_config: str | None = None):
        if Path(base).suffix in PICKLE_SUFFIXES:
            raise FinetuneError(f"base model {base} is a pickle checkpoint: only .safetensors files and diffusers folders are loaded")
        self.base_name, self.adapters_dir, self.exclude = base, Path(adapters_dir), exclude
        self.base = _frozen(load_base_model(ModelConfig.from_option(base, base_config)))
        self.lock = threading.Lock()
        self._cache: dict[tuple, object] = {}
        self.adapters: dict[str, Adapter] = {}
        self.rescan()

    def rescan(self) -> dict[str, Adapter]:
        self.adapters = scan_adapters(self.adapters_dir, self.exclude)
        self._cache.clear()
        return self.adapters

    def names(self, kind: str) -> list[str]:
        return [a.name for a in self.adapters.values() if a.kind == kind and not a.refused]

    def adapter(self, name: str, kind: str) -> Adapter:
        """The scanned adapter called `name`: the only way a request reaches a file."""
        adapter = self.adapters.get(name)
        if adapter is None or adapter.kind != kind:
            raise FinetuneError(f"unknown {kind} '{name}': pick one from the list (press Rescan for newly trained ones)")
        if adapter.refused:
            raise FinetuneError(f"{kind} '{name}' cannot be used: {adapter.refused}")
        return adapter

    def _cached(self, adapter: Adapter, load: Callable[[], object]) -> object:
        """Loaded adapters, keyed by file and modification time (a retrained file is read again); at
        most CACHE_SIZE of a kind stay in memory (a DreamBooth pipeline is a whole model)."""
        try:
            stat = adapter.path.stat()
        except OSError:
            raise FinetuneError(f"{adapter.kind} '{adapter.name}' is gone from {self.adapters_dir}: press Rescan") from None
        key = (adapter.kind, str(adapter.path), stat.st_mtime_ns, stat.st_size)
        value = self._cache.get(key)
        if value is None:
            value = load()
            same_kind = [k for k in self._cache if k[0] == adapter.kind]
            for old in same_kind[: max(0, len(same_kind) - CACHE_SIZE[adapter.kind] + 1)]:
                self._cache.pop(old, None)
            self._cache[key] = value
        return value

    def model(self, name: str) -> BaseModel:
        if name in (BASE, "", None):
            return self.base
        adapter = self.adapter(name, "pipeline")
        return self._cached(adapter, lambda: _frozen(load_base_model(ModelConfig(pretrained=str(adapter.path)))))

    def render(self, request: Request, progress: Callable[[int, int], None] | None = None):
        """(images[row][column], column labels, the row's seeds, a one-line summary)."""
        with self.lock:
            return self._render(request, progress or (lambda done, total: None))

    def _render(self, request: Request, progress):
        started = time.perf_counter()
        _check_request(request)
        model = self.model(request.model)
        models = {"unet": model.unet, "text_encoder": model.text_encoder}
        loras = []
        for name, strength in request.loras:
            adapter = self.adapter(name, "lora")
            lora = self._cached(adapter, lambda: load_lora(adapter.path))
            _check_lora_fits(models, lora, name, model.source)
            loras.append((lora, strength))
        controlnet = condition = None
        if request.controlnet:
            adapter = self.adapter(request.controlnet, "controlnet")
            controlnet = self._cached(adapter, lambda: _load_controlnet(adapter.path))
            _check_controlnet_fits(controlnet, model.unet, request.controlnet, model.source)
            condition = conditioning_image(request.conditioning_image, request.conditioning_kind, request.size)
        columns = [("base", self.base, [], None, 0.0)] if request.include_base else []
        chosen = [name for name, _ in request.loras] + ([request.controlnet] if controlnet else []) + ([request.model] if model is not self.base else [])
        trained_for = {name: self.adapters[name].metadata for name in chosen}  # their metadata, for the prediction type
        label = "+".join(n.rsplit("/", 1)[-1] for n in chosen)
        label = label if len(label) <= 20 else "adapters"
        for s in request.strengths if chosen else ([] if request.include_base else [1.0]):
            columns.append((f"{label} x{s:g}" if chosen else "base", model, [(lora, w * s) for lora, w in loras], controlnet, request.conditioning_scale * s))
        total, done = max(1, len(columns) * request.rows * request.steps), 0
        results: list[list[Image.Image]] = [[] for _ in range(request.rows)]
        for column_label, column_model, column_loras, column_controlnet, scale in columns:
            pipeline = _pipeline(column_model, column_controlnet)
            if column_label != "base":
                follow_adapters_prediction_type(pipeline, trained_for)
            extra = dict(image=condition, controlnet_conditioning_scale=scale) if column_controlnet is not None else {}

            def step_done(pipe, step, timestep, kwargs):
                nonlocal done
                done += 1
                progress(done, total)
                return kwargs

            with loras_applied({"unet": column_model.unet, "text_encoder": column_model.text_encoder}, column_loras):
                for r in range(request.rows):
                    image = generate(pipeline, [request.prompt], 1, request.seed + r, request.steps, request.guidance, request.size,
                                     negative_prompt=request.negative_prompt or None, callback_on_step_end=step_done, **extra)[0][0]
                    results[r].append(image)
        labels = [c[0] for c in columns]
        if condition is not None:
            labels, results = ["conditioning", *labels], [[condition, *row] for row in results]
        seeds = [request.seed + r for r in range(request.rows)]
        return results, labels, seeds, f"{len(columns)} column(s) x {request.rows} row(s) in {time.perf_counter() - started:.1f} s"


def _frozen(model: BaseModel) -> BaseModel:
    for part in (model.unet, model.vae, model.text_encoder):
        freeze(part)
    return model


def _check_request(request: Request) -> None:
    names = [name for name, _ in request.loras]
    for bad, message in (
        (max(len(request.prompt), len(request.negative_prompt)) > 2000, "prompts are limited to 2000 characters (the text encoder reads 77 tokens)"),
        (not 0 <= request.seed < 2**32, f"seed must be 0 to 2^32-1, got {request.seed}"),
        (not 1 <= request.steps <= 150, f"steps must be 1 to 150, got {request.steps}"),
        (request.size % 8 or not 32 <= request.size <= 1024, f"size must be a multiple of 8 from 32 to 1024, got {request.size}"),
        (not 1 <= request.rows <= 4, f"rows must be 1 to 4, got {request.rows}"),
        (len(set(names)) != len(names), "the same LoRA is selected twice: pick each LoRA once and set its strength"),
    ):
        if bad:
            raise FinetuneError(message)


def _check_lora_fits(models: dict[str, torch.nn.Module], lora: LoRA, name: str, base: str) -> None:
    trained_on = lora.metadata.get("finetune.base_model", "unknown")
    for key, layer in lora.layers.items():
        part, path = key.split(".", 1)
        try:
            weight = find_module(models[part], path, part).weight
        except (FinetuneError, AttributeError):
            raise FinetuneError(f"LoRA '{name}' does not fit base model {base}: it has no layer {key} (the LoRA was trained on {trained_on})") from None
        expected = tuple(layer.up.shape[:1]) + tuple(layer.down.shape[1:])
        if tuple(weight.shape) != expected:
            raise FinetuneError(f"LoRA '{name}' does not fit base model {base}: layer {key} is {tuple(weight.shape)} in the model but "
                                f"{expected} in the LoRA (the LoRA was trained on {trained_on})")


@contextlib.contextmanager
def loras_applied(models: dict[str, torch.nn.Module], loras: list[tuple[LoRA, float]]):
    """W + sum of s * (alpha/rank) * up @ down for the block, then the saved originals back, exactly."""
    originals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        with torch.no_grad():
            for lora, strength in loras:
                for key, layer in lora.layers.items():
                    part, path = key.split(".", 1)
                    weight = find_module(models[part], path, part).weight
                    originals.setdefault(id(weight), (weight, weight.detach().clone()))
                    weight.copy_((weight.float() + layer.delta(strength)).to(weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for weight, saved in originals.values():
                weight.copy_(saved)


def _load_controlnet(folder: Path):
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(folder, torch_dtype=torch.float32, use_safetensors=True).eval().requires_grad_(False)


def _check_controlnet_fits(controlnet, unet, name: str, base: str) -> None:
    for key in ("block_out_channels", "cross_attention_dim", "in_channels", "down_block_types", "layers_per_block"):
        mine, theirs = controlnet.config.get(key), unet.config.get(key)
        if mine is not None and theirs is not None and json.dumps(mine) != json.dumps(theirs):
            raise FinetuneError(f"ControlNet '{name}' does not fit base model {base}: its {key} is {mine}, the UNet's is {theirs}")


def _pipeline(model: BaseModel, controlnet):
    """A DDIM pipeline over the model's parts; with a ControlNet, diffusers' ControlNet pipeline."""
    if controlnet is None:
        return build_pipeline(model)
    from diffusers import StableDiffusionControlNetPipeline

    return build_pipeline(model, pipeline_class=StableDiffusionControlNetPipeline, controlnet=controlnet)


def conditioning_image(image: Image.Image | None, kind: str, size: int) -> Image.Image:
    """The uploaded image, center-cropped to `size`, used as is or turned into a conditioning map."""
    from finetune.conditions import make_condition

    if image is None:
        raise FinetuneError("a ControlNet needs a conditioning image: upload one, or a photo and pick canny, luminance or mask")
    if kind not in CONDITIONING_KINDS:
        raise FinetuneError(f"unknown conditioning kind '{kind}': use one of {', '.join(CONDITIONING_KINDS)}")
    if image.width * image.height > MAX_INPUT_PIXELS:
        raise FinetuneError(f"the uploaded image is {image.width}x{image.height}: at most {MAX_INPUT_PIXELS // 1_000_000} megapixels")
    fitted = ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.LANCZOS)
    return fitted if kind == "as uploaded" else make_condition(fitted, kind)
