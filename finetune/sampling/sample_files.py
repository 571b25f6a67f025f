"""The files `finetune sample` writes: numbered runs that never replace what a folder already holds.

Each run's images and grid share one number, the next after the highest any file in the folder starts with
(`00003-prompt0_seed0.png`, ..., `00003-grid.png`), as AUTOMATIC1111's webui numbers its outputs: two runs
with different prompts into one --out keep both, and a run's files sort together and after the earlier runs'.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from finetune.outputs.atomic_files import flush_to_disk, sync_folder

NUMBER_WIDTH = 5  # 00000-, as the webui's; more runs than that just take more digits
# The PNG text chunk an image's settings are written in, as the webui writes them and its PNG Info tab reads them: runs
# of several samplers and step counts in one folder were told apart only by their numbers.
PARAMETERS = "parameters"
WEBUI_CONTROLNET_WEIGHTS = (0.0, 2.0)  # sd-webui-controlnet's unit weight slider: its PNG Info sets no weight outside it
_NUMBERED = re.compile(r"^(\d+)-")


def next_run_number(folder: Path) -> int:
    """One past the highest number a name in `folder` starts with (`12-...`, `00012-...`); 0 in a folder without any."""
    if not folder.is_dir():
        return 0
    numbers = [int(found.group(1)) for entry in folder.iterdir() if (found := _NUMBERED.match(entry.name))]
    return max(numbers, default=-1) + 1


def parameters_text(prompt: str, negative_prompt: str | None, steps: int, sampler: str, guidance: float, seed: int, size: int,
                    base: str, lora: tuple[str, str | None] | None = None, lora_scale: float = 1.0, controlnet: str | None = None,
                    conditioning_scale: float = 1.0) -> str:
    """An image's settings in the webui's words and order: the prompt, its negative, then "Steps: 25, Sampler: DDIM,
    CFG scale: 7.5, Seed: 0, Size: 64x64, Model: sd15" (the sampler by the webui's name for it, which its txt2img reads
    back: finetune/sampling/samplers.py's webui_sampler_fields). `lora`: `webui_lora`'s (name, short hash or None), written
    as the webui's own infotext writes a LoRA: `<lora:name:strength>` in the prompt, which is what its txt2img applies (a
    "Lora: name" setting, as this wrote before, it ignores), and `Lora hashes: "name: hash"`, by which its PNG Info finds
    the file under another name. `controlnet`: `webui_controlnet`'s model, at `conditioning_scale`, as the webui's ControlNet
    extension writes its first unit (`controlnet_unit_text`). The base, LoRA and ControlNet by name (`base_names.shared_base_name`):
    an image is shared, and a path would carry the user's folders into every copy."""
    from finetune.outputs.base_names import shared_base_name
    from finetune.sampling.samplers import webui_sampler_fields

    adapter = ""
    if lora is not None:
        name, short_hash = lora
        # After a space, not ", ": the webui takes the tag out of the prompt, and a comma left behind would be a token
        # finetune did not draw with.
        prompt = " ".join(filter(None, [prompt, f"<lora:{name}:{lora_scale:g}>"]))
        # Quoted as the webui quotes a setting holding ':' or ','; the name without those, as it writes it.
        adapter = f', Lora hashes: "{name.replace(":", "").replace(",", "")}: {short_hash}"' if short_hash else ""
    lines = [prompt, *([f"Negative prompt: {negative_prompt}"] if negative_prompt else [])]
    settings = f"Steps: {steps}, {webui_sampler_fields(sampler)}, CFG scale: {guidance:g}, Seed: {seed}, Size: {size}x{size}, Model: {shared_base_name(base)}"
    control = f", ControlNet 0: {json.dumps(controlnet_unit_text(controlnet, conditioning_scale), ensure_ascii=False)}" if controlnet else ""
    return "\n".join([*lines, settings + adapter + control])


def controlnet_unit_text(model: str, weight: float) -> str:
    """A ControlNet unit as sd-webui-controlnet's infotext writes one (its ControlNetUnit's fields by their display names,
    values as Python's str() writes them; the webui quotes the whole as it quotes any setting holding ',' or ':'), set as
    `finetune sample` draws: the conditioning image as given (Module: none, no preprocessor), covered and center-cropped to
    the size (its "Crop and Resize"), at `weight` (--conditioning-scale) over every step (Guidance Start 0, End 1), in
    diffusers' plain mode (its "Balanced"). The preprocessor's resolution and thresholds are left out, as the extension
    leaves out a hidden slider's: module none runs no preprocessor. Its PNG Info sets the unit from this; a weight outside
    the 0 to 2 the unit takes is not set (the webui's console says why)."""
    fields = {"Module": "none", "Model": model, "Weight": float(weight), "Resize Mode": "Crop and Resize", "Guidance Start": 0.0,
              "Guidance End": 1.0, "Pixel Perfect": False, "Control Mode": "Balanced"}
    return ", ".join(f"{field}: {value}" for field, value in fields.items())


def webui_weight_note(weight: float) -> str | None:
    """A line where `weight` (--conditioning-scale) is outside the 0 to 2 of the webui's ControlNet unit weight slider:
    the images record it (`controlnet_unit_text`), and the webui's PNG Info leaves a weight it cannot take unset. None within."""
    low, high = WEBUI_CONTROLNET_WEIGHTS
    if low <= weight <= high:
        return None
    side = f"over {high:g}, the most" if weight > high else f"below {low:g}, the least"
    return (f"--conditioning-scale {weight:g} is {side} the webui's ControlNet extension takes as a unit's weight: the images record it "
            "(ControlNet 0: Weight), and its PNG Info will not set that weight from them (sampling goes on at it)")  # fmt: skip


def webui_controlnet(controlnet: str) -> str:
    """The ControlNet given as `controlnet` as the webui's ControlNet extension lists it, "name [hash]", once its weights
    file is copied into the webui's models/ControlNet as `<name>.safetensors` (the extension loads diffusers' layout as it
    is, so the copy is that file, byte for byte): the name `controlnet_name`'s, the hash the webui's old model hash of that
    file (sha256 of the 64 KiB from 1 MiB in, 8 hex digits). The name alone where the folder holds no single safetensors file."""
    from finetune.controlnet.folder import resolve_controlnet_folder, weights_variant

    folder = resolve_controlnet_folder(controlnet)
    variant = weights_variant(folder).get("variant")
    weights = folder / ".".join(filter(None, ["diffusion_pytorch_model", variant, "safetensors"]))
    name = controlnet_name(folder)
    return f"{name} [{webui_model_hash(weights)}]" if weights.is_file() else name


def webui_model_hash(weights: Path) -> str:
    """The webui's old model hash (sd_models.model_hash), by which its ControlNet extension names a model in its list."""
    with open(weights, "rb") as opened:
        opened.seek(0x100000)
        return hashlib.sha256(opened.read(0x10000)).hexdigest()[:8]


def controlnet_name(folder: Path) -> str:
    """A ControlNet folder by the name a creator knows it by: a run's `<run>/controlnet` by its run, a checkpoint's by run
    and step (`edges-step00000200`, as a checkpoint's LoRA is named), a hub download by its repository's name, any other
    by its own; without ',' or ':', which the extension's unit text cannot hold."""
    from finetune.checkpoints.run_files import CONTROLNET_DIR, checkpoint_stem
    from finetune.outputs.base_names import hub_id_of_snapshot

    folder = Path(os.path.abspath(folder))
    name = (hub_id_of_snapshot(folder) or "").split("/")[-1] or folder.name
    if folder.name == CONTROLNET_DIR:
        name = checkpoint_stem(folder.parent) or folder.parent.name
    return name.replace(",", "").replace(":", "")


def webui_lora(lora: str) -> tuple[str, str | None]:
    """The LoRA given as `lora` as the webui names it (`lora_name`) and its short hash there (`webui_lora_hash`) where the
    file sampled with is the file of that name; None for a run's or checkpoint's LoRA, which the webui gets as export
    writes it, in another layout and so with another hash (a hash of no file there is worse than none)."""
    from finetune.checkpoints.run_files import resolve_lora_file

    lora_file = resolve_lora_file(lora)
    name = lora_name(lora)
    return name, webui_lora_hash(lora_file) if lora_file.stem == name and lora_file.suffix.lower() == ".safetensors" else None


def webui_lora_hash(lora_file: Path) -> str:
    """What the webui keys a .safetensors LoRA by, first 12 hex digits: the `sshs_model_hash` sd-scripts records in its
    header where there is one, else sd-scripts' "addnet" hash, the sha256 of the file past its header (not of the whole
    file: a header edited in a metadata editor leaves it as it was). Read once per run, at disk speed."""
    with open(lora_file, "rb") as opened:
        header_size = int.from_bytes(opened.read(8), "little")
        recorded = json.loads(opened.read(header_size)).get("__metadata__", {}).get("sshs_model_hash")
        if recorded:
            return recorded[:12]
        digest = hashlib.sha256()
        while chunk := opened.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def lora_name(lora: str) -> str:
    """A LoRA given as `lora` (a file, or a run's or checkpoint's folder; `--lora .` from inside one) by the name the webui
    lists it by once `finetune export` has written it there (`run_files.webui_lora_stem`): a checkpoint's as run-stepNNNNNNNN,
    the name of export's file. It was `run@314`, which named no file a webui user had."""
    from finetune.checkpoints.run_files import resolve_lora_file, webui_lora_stem

    return webui_lora_stem(Path(os.path.abspath(resolve_lora_file(lora))))


def _png_text(image: Image.Image) -> PngInfo | None:
    """The image's PARAMETERS (image.info) as a PNG text chunk: Pillow writes none of image.info by itself."""
    if PARAMETERS not in image.info:
        return None
    chunks = PngInfo()
    chunks.add_text(PARAMETERS, image.info[PARAMETERS])
    return chunks


def write_numbered(folder: Path, named_images: list[tuple[str, Image.Image]]) -> list[Path]:
    """Write each (name, image) as `NNNNN-name` under the folder's next run number, with its PARAMETERS where it has
    them; the paths, in order.

    A file is published only where no file of that name is (hard-linked into place from its temporary name,
    which fails on an existing name rather than replacing it): a second process numbering the same run at
    the same moment makes this run take the next number instead.
    """
    folder.mkdir(parents=True, exist_ok=True)
    partials = []
    try:
        for name, image in named_images:  # written once, under temporary names, then linked as often as needed
            partial = folder / f".{os.getpid()}-{len(partials)}-{name}.partial"
            image.save(partial, format="PNG", pnginfo=_png_text(image))
            partials.append(flush_to_disk(partial))
        while True:
            number = next_run_number(folder)
            paths = [folder / f"{number:0{NUMBER_WIDTH}d}-{name}" for name, _ in named_images]
            published = []
            try:
                for partial, path in zip(partials, paths):
                    _publish_without_replacing(partial, path)
                    published.append(path)
            except FileExistsError:  # another run took this number meanwhile: ours goes under the next
                for path in published:
                    path.unlink(missing_ok=True)
                continue
            sync_folder(folder)
            return paths
    finally:
        for partial in partials:
            partial.unlink(missing_ok=True)


def _publish_without_replacing(partial: Path, path: Path) -> None:
    try:
        os.link(partial, path)  # FileExistsError where `path` is taken: never replaced
    except OSError as err:
        if isinstance(err, FileExistsError) or err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.EINVAL):
            raise
        # A file system without hard links (FAT, some network mounts; on Windows an exFAT or FAT32 drive says
        # ERROR_INVALID_FUNCTION, which Python reads as EINVAL): an exclusive create, then the bytes.
        with open(path, "xb") as created:
            created.write(partial.read_bytes())
