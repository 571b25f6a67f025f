"""`finetune eval`: score a base model (plus an optional LoRA or ControlNet) on the toy world.

Every method proves it learns here. A suite generates images for a fixed prompt set and
reads them with the toy-world classifier (``finetune.toyworld.metrics``):

==========  ==========  ===========================================================
suite       prompts     metrics
==========  ==========  ===========================================================
adherence   held_in     ``adherence_<attribute>``, ``adherence_all`` (prompt_adherence)
fid         held_in     ``fid``: Fréchet distance to real renders of the same scenes
subject     subject     ``subject_fidelity``: share drawn as the subject shape
drift       class       ``prior_drift``: share of class prompts drawn as the subject
style       style       ``style_share``: share classified ``striped``
control     control     ``control_iou``: mean IoU of the generated shape (segmented) with
                        the control mask; ``control_chance_iou``: the same with another
                        scene's mask (the level of a model that ignores the control)
placement   placement   ``placement_iou`` / ``placement_chance_iou``: the same, but the
                        prompts leave size and position to the mask
==========  ==========  ===========================================================

The prompt sets (fixed prompts, their scenes, and masks for the control suites) are built in
``finetune.toyworld.prompt_sets``, which documents each one; ``seed`` only picks the noise
(image k of prompt p uses ``seed + p * images_per_prompt + k``, see ``generate_per_prompt``).

With ``controlnet`` (``--controlnet``) the control and placement suites sample with
``StableDiffusionControlNetPipeline`` (prompt + mask, ``conditioning_scale``); they are the
default suites then, and the only ones (the other prompt sets have no conditioning
images). Without it they sample the same prompts with the plain pipeline:
the "base model with no ControlNet" row, whose IoU is only what the caption's size and
position give. Each generated image is segmented (``metrics.segment``) and compared with
its own scene's mask (``control_iou``) and, for the chance level, with the next scene's
(``metrics.chance_iou``'s derangement, taken per seed so an image is never compared with
its own prompt's mask).

To add a suite: add a prompt-set builder to ``prompt_sets.PROMPT_SETS`` and a scorer to ``SUITES``;
a prompt set's ``conditions`` (one image per prompt) reach a ControlNet pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from finetune.counts import counted
from finetune.data.image_bounds import grid_problem
from finetune.errors import FinetuneError
from finetune.models.native_resolution import native_resolution
from finetune.toyworld.metrics import (
    attribute_share,
    chance_iou,
    control_iou,
    frechet_distance,
    prior_drift,
    prompt_adherence,
    subject_fidelity,
)
from finetune.toyworld.prompt_sets import PROMPT_SETS, PromptSet
from finetune.toyworld.world import SHAPES, draw

DEFAULT_SUITES = ("adherence", "fid")
CONTROL_SUITES = ("control", "placement")  # the default, and the only suites, with a ControlNet
GRID_PROMPTS = 8  # the prompts of each prompt set a report's grid shows, a row each


def render_scenes(ps: PromptSet, per_prompt: int, salt: tuple[int, ...] = ()) -> list[list]:
    """Real world images of the prompt set's scenes, jittered by (set seed, prompt, image, *salt): images[p][k], as a
    model's rows are (the fid suite's reference; tests/real_renders.py scores them in a model's place).

    numpy's seed sequences ignore trailing zeros ([s, i, k, 0] draws as [s, i, k] does), so a salt must
    not end in 0: it would draw the unsalted renders (and [s, i, 0] with k 0 draws datasets.generate's)."""
    return [[draw(s, 64, np.random.default_rng([ps.seed, i, k, *salt]))[0] for k in range(per_prompt)] for i, s in enumerate(ps.scenes)]


def _adherence(images, prompts, ps, o):
    scores = prompt_adherence(images, prompts)
    n = scores.pop("n")
    return {f"adherence_{k}": (v, n) for k, v in scores.items()}


def _fid(images, prompts, ps, o):
    real = [im for row in render_scenes(ps, o["images_per_prompt"]) for im in row]
    return {"fid": (frechet_distance(images, real), len(images))}


def _control(images, prompts, ps, o, prefix="control"):
    per_prompt = o["images_per_prompt"]
    own_masks = [mask for mask in ps.conditions for _ in range(per_prompt)]  # images are prompt-major
    # Chance: image k of prompt p against prompt p+1's mask (metrics.chance_iou over the images of seed k).
    # Shifting the flat list instead would pair a prompt's image with its own mask whenever per_prompt > 1.
    chance = np.mean([chance_iou(images[k::per_prompt], ps.conditions) for k in range(per_prompt)])
    return {f"{prefix}_iou": (control_iou(images, own_masks), len(images)), f"{prefix}_chance_iou": (chance, len(images))}


#: suite -> (prompt set, scorer(images, prompts, prompt set, options) -> {metric: (value, n)})
SUITES = {
    "adherence": ("held_in", _adherence),
    "fid": ("held_in", _fid),
    "subject": ("subject", lambda im, p, ps, o: {"subject_fidelity": (subject_fidelity(im, o["subject"]), len(im))}),
    "drift": ("class", lambda im, p, ps, o: {"prior_drift": (prior_drift(im, o["subject"]), len(im))}),
    "style": ("style", lambda im, p, ps, o: {"style_share": (attribute_share(im, "style", "striped"), len(im))}),
    "control": ("control", _control),
    "placement": ("placement", lambda im, p, ps, o: _control(im, p, ps, o, prefix="placement")),
}


def default_suites(suites, controlnet: str | None) -> list[str]:
    return list(dict.fromkeys(suites or (CONTROL_SUITES if controlnet else DEFAULT_SUITES)))


def checked_suites(suites, options: dict) -> list[str]:
    """The suites asked for (the default ones where none are), deduplicated, once the request (`options`: n, images_per_prompt,
    subject, class_word, controlnet) is checked: raises FinetuneError before any model is loaded."""
    suites = list(dict.fromkeys(suites or DEFAULT_SUITES))
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise FinetuneError(f"unknown eval suite {unknown[0]!r}: choose from {', '.join(SUITES)}")
    if not options["class_word"].strip():
        raise FinetuneError("the class word is empty: pass e.g. --class-word shape")
    if options["subject"] not in SHAPES:
        raise FinetuneError(f"subject {options['subject']!r} is not a toy-world shape: choose from {', '.join(SHAPES)}")
    images = options["n"] * options["images_per_prompt"]
    if options["n"] < 1 or options["images_per_prompt"] < 1 or ("fid" in suites and images < 2):
        raise FinetuneError("--num-prompts and --images-per-prompt must be >= 1 (and give >= 2 images for the fid suite)")
    if set(CONTROL_SUITES) & set(suites) and options["n"] < 2:
        raise FinetuneError("the control and placement suites need --num-prompts >= 2 (their chance level compares each image with another scene's mask)")
    if options.get("controlnet"):
        other = [s for s in suites if s not in CONTROL_SUITES]
        if other:
            raise FinetuneError(
                f"suite {other[0]!r} has no conditioning images for --controlnet: pass --suite control/placement, or leave out --controlnet"
            )
    return suites


def score_suites(make_rows, suites, options: dict) -> dict:
    """Generate each needed prompt set once (``make_rows(name, prompt set) -> images[p][k]``), score every suite: the result
    run_eval returns, without its settings. `make_rows` may draw with a model (run_eval) or be the world's own renders."""
    suites = checked_suites(suites, options)
    sets, rows, result = {}, {}, {"metrics": {}, "n": {}, "prompts": {}, "images": {}, "conditions": {}}
    for suite in suites:
        name, scorer = SUITES[suite]
        if name not in sets:
            sets[name] = PROMPT_SETS[name](options)
            rows[name] = make_rows(name, sets[name])
        ps = sets[name]
        images = [im for row in rows[name] for im in row]
        prompts = [p for p, row in zip(ps.prompts, rows[name]) for _ in row]
        for metric, (value, n) in scorer(images, prompts, ps, options).items():
            result["metrics"][metric], result["n"][metric] = float(value), int(n)
        result["prompts"][name], result["images"][name] = ps.prompts, rows[name]
        if ps.conditions:
            result["conditions"][name] = ps.conditions
    return result


def generate_per_prompt(pipeline, prompts, images_per_prompt, seed, steps, guidance, resolution, conditions=None, **call_kwargs):
    """images[p][k] with seed ``seed + p * images_per_prompt + k``: fresh noise for every image.

    With one seed for all prompts (as ``finetune sample`` does, to compare prompts) the images of a
    suite would share their noise, and what the noise decides (here: much of the shape) would count
    once, not once per image. Prompt i of the subject and class sets still share a seed (paired).
    """
    from finetune.sampling.pipelines import generate  # torch/diffusers-heavy: loaded when generating

    seeds = [seed + p * images_per_prompt for p in range(len(prompts))]
    return generate(pipeline, prompts, images_per_prompt, seeds, steps, guidance, resolution, conditions=conditions, **call_kwargs)


def refuse_a_report_grid(suites, num_prompts: int, images_per_prompt: int, resolution: int | None) -> None:
    """The report's grids, drawn as sample's are, checked at the model's own `resolution` (None: not known yet) before
    any image is made: the rows of the control suites start with the prompt's conditioning image."""
    conditioned = 1 if set(CONTROL_SUITES) & set(suites) else 0
    if resolution and (problem := grid_problem("report grid", "--images-per-prompt", images_per_prompt, min(num_prompts, GRID_PROMPTS),
                                                resolution, conditioned, "lower --images-per-prompt")):  # fmt: skip
        raise FinetuneError(problem)


def run_eval(
    base: str,
    lora: str | None = None,
    lora_scale: float = 1.0,
    suites=None,
    num_prompts: int = 64,
    images_per_prompt: int = 1,
    steps: int = 25,
    guidance: float = 5.0,
    seed: int = 0,
    identifier: str = "sks",
    subject: str = "star",
    class_word: str = "shape",
    controlnet: str | None = None,
    conditioning_scale: float | None = None,
    out: str | Path | None = None,
    base_config: str | None = None,
    base_as: str | None = None,
) -> dict:
    """Generate with ``base`` (+ ``lora``, + ``controlnet``) for each suite and score the images. The report names the
    base ``base_as`` where given (by name, for a base no one gave: the adapter's record), else as ``base`` is given.

    ``suites`` defaults to adherence and fid, or to control with a ``controlnet`` (a ControlNet
    folder or a controlnet run's output folder), which steers every image with its scene's mask
    at ``conditioning_scale`` (default 1.0).

    Returns ``{"settings", "metrics": {name: value}, "n": {name: images scored},
    "prompts": {prompt set: prompts}, "images": {prompt set: images[p][k]},
    "conditions": {prompt set: conditioning image per prompt}}``; with ``out`` also writes it
    (images as grids) via :func:`write_report`.
    """
    from finetune.controlnet.folder import resolve_controlnet_folder
    from finetune.sampling.adapter_records import adapter_base
    from finetune.sampling.inference import base_model_metadata, load_sampling_pipeline
    from finetune.sampling.samplers import spacing_steps_problem

    if controlnet is None and conditioning_scale is not None:
        raise FinetuneError("--conditioning-scale steers a ControlNet: pass --controlnet PATH too, or leave it out")
    if controlnet is not None:
        resolve_controlnet_folder(controlnet)
    scale = 1.0 if conditioning_scale is None else conditioning_scale
    options = dict(n=num_prompts, images_per_prompt=images_per_prompt, identifier=identifier, subject=subject,
                   class_word=class_word, controlnet=controlnet is not None)  # fmt: skip
    suites = checked_suites(default_suites(suites, controlnet), options)  # before the (slow) model load
    # `finetune eval` checked this already, before torch imported (as this function's first line does); read again
    # (two small JSON files) so that every caller of run_eval is refused before the model loads.
    refuse_a_report_grid(suites, num_prompts, images_per_prompt, native_resolution(base, base_config))
    from finetune.sampling.pipelines import denoising_bar
    from finetune.sampling.placement import inference_placement, place, without_tf32

    pipeline = load_sampling_pipeline(base, lora, lora_scale, controlnet, base_config=base_config)
    # DDIM (eval's one sampler) has no step limit below --steps' 999, but on trailing spacing (an adapter trained with
    # model.zero_terminal_snr, or a base's own) some counts draw a last step at timestep -1: refused before drawing.
    if problem := spacing_steps_problem(pipeline.scheduler, steps):
        raise FinetuneError(f"--steps: {problem}")
    pipeline.unet.eval()
    place(pipeline, *inference_placement("auto", "fp32"))  # the GPU if any; fp32, so reports compare across machines
    resolution = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    options["resolution"] = resolution
    refuse_a_report_grid(suites, num_prompts, images_per_prompt, resolution)  # a base whose configs said no resolution before it loaded

    def make_rows(name: str, ps: PromptSet):
        control = {} if controlnet is None else dict(controlnet_conditioning_scale=scale)
        # A bar per prompt set, named by it: minutes without a word on a CPU (3 for the ControlNet suites).
        with denoising_bar(pipeline, f"sampling {name}", len(ps.prompts) * images_per_prompt * steps):
            return generate_per_prompt(pipeline, ps.prompts, images_per_prompt, seed, steps, guidance, resolution,
                                       ps.conditions if controlnet is not None else None, **control)  # fmt: skip

    with without_tf32():  # fp32 in full: TF32 would make a GPU's scores differ more from a CPU's
        result = score_suites(make_rows, suites, options)
    result["settings"] = dict(
        base=base_as or str(base), lora=None if lora is None else str(lora), lora_scale=lora_scale,
        controlnet=None if controlnet is None else str(controlnet), conditioning_scale=scale if controlnet else None, suites=suites,
        num_prompts=num_prompts, images_per_prompt=images_per_prompt, steps=steps, guidance=guidance, seed=seed,
        identifier=identifier, subject=subject, class_word=class_word, resolution=resolution, **sampled_as(pipeline),
        # Which training of the adapter was scored: a report left in a run folder that trained on afterwards
        # (--resume, --overwrite) read as the score of the newer weights beside it.
        adapter_steps=adapter_base(lora, controlnet, "finetune.steps"),
        # With both, adapter_steps is the LoRA's: the ControlNet's own, or reports of its checkpoints all read alike.
        **({"controlnet_steps": adapter_base(None, controlnet, "finetune.steps")} if lora and controlnet else {}),
        # A full fine-tune's or a merge's pipeline scored as the base: its own steps, as a report beside it needs them too.
        base_steps=base_model_metadata(base).get("finetune.steps"),
    )  # fmt: skip
    if out:
        write_report(result, out)
    return result


def sampled_as(pipeline) -> dict:
    """How the pipeline encodes prompts and samples, as the adapters' runs recorded it: two reports of one
    adapter compare only when these agree."""
    from finetune.models.encoders import layer_stack
    from finetune.sampling.pipelines import trained_prompt_chunks

    layers = pipeline.text_encoder.config.num_hidden_layers
    scheduler = pipeline.scheduler.config
    return dict(clip_skip=layers - len(layer_stack(pipeline.text_encoder).layers) + 1, prediction_type=scheduler.prediction_type,
                zero_terminal_snr=bool(scheduler.get("rescale_betas_zero_snr", False)),
                max_token_length=75 * trained_prompt_chunks(pipeline))  # fmt: skip


def write_report(result: dict, out: str | Path) -> Path:
    """Write ``result`` (without images) as JSON to ``out``, plus ``<out stem>_<prompt set>.png``:
    the first GRID_PROMPTS prompts of each prompt set, one labelled row each (for the docs),
    starting with the prompt's conditioning image where the set has them."""
    from finetune.data.image_bounds import GRID_LABEL_WIDTH
    from finetune.outputs.atomic_files import atomic_write
    from finetune.sampling.grids import make_grid, save_image_atomic

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {k: result[k] for k in ("settings", "metrics", "n", "prompts") if k in result}
    report["grids"] = {}
    for name, rows in result.get("images", {}).items():
        conditions = result.get("conditions", {}).get(name)
        if conditions:
            rows = [[condition, *row] for condition, row in zip(conditions, rows)]
        grid = out.with_name(f"{out.stem}_{name}.png")
        save_image_atomic(make_grid(rows[:GRID_PROMPTS], row_labels=result["prompts"][name][:GRID_PROMPTS], label_width=GRID_LABEL_WIDTH), grid)
        report["grids"][name] = grid.name
    return atomic_write(out, lambda partial: partial.write_text(json.dumps(report, indent=2) + "\n"), durable=False)


def print_table(result: dict) -> None:
    """One row per metric: name, value, number of images scored."""
    from rich.console import Console
    from rich.table import Table

    settings = result.get("settings", {})
    title = f"eval of {settings.get('base')}" + "".join(f" + {settings[k]}" for k in ("lora", "controlnet") if settings.get(k))
    if settings.get("controlnet_steps"):
        title += f" (LoRA trained {settings.get('adapter_steps') or '?'} steps, ControlNet {settings['controlnet_steps']})"
    elif settings.get("adapter_steps"):
        title += f" (trained {counted(settings['adapter_steps'], 'step')})"
    elif settings.get("base_steps") and not (settings.get("lora") or settings.get("controlnet")):  # not taken for the adapter's
        title += f" (trained {counted(settings['base_steps'], 'step')})"
    table = Table("metric", "value", "n")
    for metric, value in result["metrics"].items():
        table.add_row(metric, f"{value:.3f}" if metric != "fid" else f"{value:.2f}", str(result["n"][metric]))
    console = Console()
    # The title on a line of its own: as the table's title, rich wrapped it to the narrow table's width,
    # splitting the model paths mid-word ("finetune/assets/toyworld-ba" / "se + outputs/...").
    console.print(title, soft_wrap=True, highlight=False, markup=False)
    console.print(table)
