"""The `finetune eval` command: its options, where its report goes, and the run (`finetune.evaluation.evaluate`)."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from finetune.errors import FinetuneError, refuse_a_file_in_the_way
from finetune.library_noise import quiet_weight_progress_bars

# finetune.evaluation.evaluate's suites and the toy world's shapes, named here so that building the command line (every
# `finetune` command, --help too) does not import numpy and PIL with them; tests/test_cli_startup.py checks they match.
SUITE_NAMES = ("adherence", "fid", "subject", "drift", "style", "control", "placement")
SHAPE_NAMES = ("circle", "square", "triangle", "diamond", "cross", "star")

EVAL_EXAMPLE = """examples:
  finetune eval --base finetune/assets/toyworld-base
  finetune eval --base finetune/assets/toyworld-base --lora outputs/striped --suite style --suite adherence
  finetune eval --base finetune/assets/toyworld-base --lora outputs/dreambooth --suite subject --suite drift
  finetune eval --base finetune/assets/toyworld-base --controlnet outputs/controlnet     (control and placement suites)
  finetune eval --base finetune/assets/toyworld-base --suite control --suite placement   (the same prompts, no ControlNet)

shares in [0, 1], higher is better, except prior_drift (lower is better; compare with the base model's);
fid: lower is better, comparable only between runs scoring the same number of images;
control_iou, placement_iou: higher is better, compare with their chance levels and with the run without --controlnet."""


# The options that write the subject and class prompts: (default, the suites that read them).
SUBJECT_OPTIONS = {"identifier": ("sks", ("subject",)), "class_word": ("shape", ("subject", "drift")), "subject": ("star", ("subject", "drift"))}


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``eval`` on the ``finetune`` subcommand parsers (``parser.add_subparsers()``)."""
    from finetune.cli.arguments import RECORDED_BASE_HELP, add_base_options, add_lora_option, add_seed_option, finite_float, positive_int, sampling_steps

    p = subparsers.add_parser(
        "eval",
        help="score a base model (+ LoRA or ControlNet) on the toy world: adherence, FID, subject, drift, style, control",
        description="Generate images for fixed toy-world prompt suites and score them with the toy-world classifier.\n"
        "Prints a table and writes a JSON report plus one grid PNG per prompt set.",
        epilog=EVAL_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_base_options(p, default_help=RECORDED_BASE_HELP)
    add_lora_option(p)
    p.add_argument("--lora-scale", type=eval_lora_strength, default=1.0, help="LoRA strength (default 1.0; one: run eval once per strength)")
    p.add_argument("--controlnet", help="ControlNet folder, or a controlnet training output folder (runs the control and placement suites)")
    p.add_argument("--conditioning-scale", type=finite_float, default=None, help="ControlNet strength (default 1.0)")
    p.add_argument("--suite", action="append", choices=SUITE_NAMES,
                   help="suite to run; repeat for several (default: adherence and fid; control and placement with --controlnet)")
    p.add_argument("--num-prompts", type=positive_int, default=64, help="prompts per suite (default 64)")
    p.add_argument("--images-per-prompt", type=positive_int, default=1, help="images per prompt; prompt p's image k has seed seed+p*N+k (default 1)")
    p.add_argument("--steps", type=sampling_steps, default=25, help="DDIM steps (default 25)")
    p.add_argument("--guidance", type=finite_float, default=5.0, help="classifier-free guidance scale (default 5.0)")
    add_seed_option(p, "noise seed; the prompts are fixed")
    p.add_argument("--identifier", default=SUBJECT_OPTIONS["identifier"][0], help="DreamBooth identifier in subject prompts (default sks)")
    p.add_argument("--subject", default=SUBJECT_OPTIONS["subject"][0], choices=SHAPE_NAMES, help="shape the subject should look like (default star)")
    p.add_argument("--class-word", default=SUBJECT_OPTIONS["class_word"][0], help="class word of subject/class prompts, 'a sks <class word>' (default shape)")
    p.add_argument("--out", help="JSON report file (default: eval-<suites>.json in the LoRA's or ControlNet's run folder, in a full "
                   "run's folder for its pipeline, else in outputs/eval/<name of the ControlNet folder or base>/)")
    return p


def eval_lora_strength(text: str) -> float:
    """An argparse type: one strength, as `sample --lora-scale` takes it; several ("1,0.5", as the demo's strengths field
    takes them) say how to score each: a report is one set of scores, and each eval's is named by its strength."""
    from finetune.cli.arguments import finite_float

    if any(separator in text for separator in ",;"):
        raise argparse.ArgumentTypeError(f"takes one strength, got {text!r}: run eval once per strength (without --out each report is "
                                         "named by its strength, e.g. eval-adherence-fid-strength0.5.json, and none replaces another)")
    return finite_float(text)


def base_tag(base: str) -> str:
    """A base model in a file name: a run's pipeline by its run, a file by its stem, a folder by its name,
    a hub id as the hub cache spells it (org--name)."""
    path = Path(base.rstrip("/") or base)
    if not path.exists():
        return base.strip("/").replace("/", "--")
    path = Path(os.path.abspath(path))  # `--base pipeline` or `.` from inside a run; a link keeps its own name
    if path.name == "pipeline":
        run = path.parent
        checkpoint = re.fullmatch(r"checkpoint-(\d+)", run.name) if run.parent.name == "checkpoints" else None
        return f"{run.parent.parent.name}-{checkpoint.group(1)}" if checkpoint else run.name
    return path.stem if path.is_file() else path.name


def subject_prompt_parts(suites, identifier: str = "sks", class_word: str = "shape", subject: str = "star") -> list[str]:
    """Report-name parts for subject and drift prompts other than the defaults ("a sks shape", read as a star):
    `--identifier "" --class-word star` scores "a star ..." prompts, another report than "a sks shape ..."'s."""
    if not {"subject", "drift"} & set(suites):
        return []
    given = (("id", identifier, "sks"), ("class", class_word, "shape"), ("as", subject, "star"))
    return [f"{name}-{re.sub(r'[^A-Za-z0-9_.]+', '_', value) or 'none'}" for name, value, default in given if value != default]


def default_out(base: str, lora: str | None, controlnet: str | None = None, suites=(), lora_scale: float = 1.0,
                conditioning_scale: float | None = None, recorded_base: str | None = None, prompt_parts=()) -> Path:
    """In the ControlNet's, the LoRA's or a full pipeline's run (or checkpoint) folder, else under
    outputs/eval/<name>/; named by what it scores (`eval-style.json`, `eval-control-placement-scale0.5.json`,
    `eval-style-with-mine.json` for a ControlNet with the LoRA mine, `eval-style-on-other.json` on a base other
    than the `recorded_base` of the adapter's run; `prompt_parts`: `subject_prompt_parts`), so reports of other suites,
    prompts, strengths, combinations, bases or LoRA files of one folder do not replace each other."""
    from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
    from finetune.sampling.adapter_records import same_model

    lora_path = Path(lora) if lora else None
    lora_name = None if lora_path is None else (lora_path.parent.name if lora_path.name == LORA_WEIGHTS_NAME else lora_path.name)
    parts = [*suites, *prompt_parts]
    if lora and lora_scale != 1.0:
        parts.append(f"strength{lora_scale:g}")
    if controlnet and conditioning_scale not in (None, 1.0):
        parts.append(f"scale{conditioning_scale:g}")
    if controlnet and lora:
        parts.append(f"with-{Path(lora_name).stem}")
    if (lora or controlnet) and recorded_base and not same_model(base, recorded_base):
        parts.append(f"on-{base_tag(base)}")
    name = "-".join(["eval", *parts]) + ".json"
    if controlnet:
        from finetune.checkpoints.run_files import CONTROLNET_DIR
        from finetune.controlnet.folder import resolve_controlnet_folder

        folder = resolve_controlnet_folder(controlnet)
        # Not inside the ControlNet folder: a model folder holds only the model.
        return folder.parent / name if folder.name == CONTROLNET_DIR else Path("outputs/eval") / folder.name / name
    if lora_path is not None:
        if lora_path.is_dir():
            return lora_path / name
        return lora_path.parent / (name if lora_path.name == LORA_WEIGHTS_NAME else f"{lora_path.stem}-{name}")
    from finetune.checkpoints.run_files import STATE_FILE
    from finetune.config.run_recipe import run_recipe_file

    base_path = Path(base.rstrip("/"))
    run = base_path.parent
    if base_path.name == "pipeline" and (run_recipe_file(run).is_file() or (run / STATE_FILE).is_file()):  # a run's or a checkpoint's pipeline
        return run / name
    return Path("outputs/eval") / (base_path.stem or "base") / name


def check_report_path(out: Path) -> None:
    """Before the images are made: the report is written as a file, its grids beside it."""
    if out.is_dir():
        raise FinetuneError(f"--out {out} is a folder: give the report's file name, e.g. {out / 'eval.json'}")
    if out.suffix.lower() != ".json":  # it is written whole as JSON: over a LoRA, an image or a recipe too
        raise FinetuneError(f"--out {out} is not a .json file name: give the report's, e.g. {out.with_suffix('.json')} (its grids go beside it)")
    refuse_a_file_in_the_way(out.parent, "the report and its grids", f"--out {out}")
    if out.exists() and not is_eval_report(out):  # a pipeline's model_index.json (the base it reads) was written over
        raise FinetuneError(f"--out {out} is a file eval did not write (not one of its reports), which the report would replace: give another file name")


def is_eval_report(path: Path) -> bool:
    """Whether `path` is a report `write_report` wrote (an earlier eval's, which a rerun replaces), by its keys."""
    import json

    try:
        report = json.loads(path.read_text()) if path.stat().st_size < 2**24 else None  # a report is kilobytes, never gigabytes
    except (OSError, ValueError):  # not text, not JSON, a folder
        return False
    return isinstance(report, dict) and {"settings", "metrics", "grids"} <= report.keys()


def check_subject_options_are_read(args, suites) -> None:
    """--identifier, --class-word and --subject given to suites that do not read them: refused before the images are made
    (`eval --lora dreambooth --identifier zwx` scored adherence and fid, no prompt with zwx, and said nothing)."""
    for name, (default, readers) in SUBJECT_OPTIONS.items():
        if getattr(args, name) != default and not set(readers) & set(suites):
            wanted = " and ".join(f"--suite {suite}" for suite in readers)
            which = f"the {' and '.join(readers)} suite{'s' if len(readers) > 1 else ''}"
            raise FinetuneError(f"--{name.replace('_', '-')} writes the prompts of {which}, which this eval does not run: add {wanted}, or leave it out")


def recorded_as_found(recorded: str | None, adapter: str) -> str | None:
    """The base the adapter's run recorded (`recorded`), found as `sample` finds it without --base: a relative path from the
    folders above `adapter` too, so the report of a run scored from another folder, on that same base, is not named -on-<base>."""
    from finetune.sampling.adapter_records import found_from_adapter

    return recorded and (found_from_adapter(recorded, adapter) or recorded)


def control_kind_note(controlnet: str | None, suites) -> str | None:
    """Why the control and placement suites' IoUs say little of a ControlNet trained on canny or luminance images (as
    make-conditions recorded them): those suites steer it with the toy world's shape masks, which it never learned to
    read, and it scored as the base does without a word (0.70 control IoU for a canny ControlNet of 10 steps). None for
    a ControlNet of masks, or one that records no kind (the toy world's own, made by make-world-data --conditioning)."""
    if controlnet is None or not {"control", "placement"} & set(suites):
        return None
    from finetune.controlnet.conditioning_records import recorded_conditioning, recorded_kind
    from finetune.controlnet.folder import resolve_controlnet_folder
    from finetune.sampling.adapter_records import saved_model_metadata

    recorded = saved_model_metadata(resolve_controlnet_folder(controlnet))
    if recorded_kind(recorded) in (None, "mask"):
        return None
    return (f"this ControlNet was trained on {recorded_conditioning(recorded)} conditioning images (finetune make-conditions); the control "
            "and placement suites steer it with the toy world's shape masks, which it never learned to read, so their IoUs say little "
            "of it: they score a ControlNet trained on masks (finetune make-world-data --conditioning, or make-conditions --kind mask)")


def run_eval_command(args) -> int:
    """``finetune eval``: run, print the table, write the report."""
    from finetune.cli.main import base_or_recorded, check_local_base, check_lora_fits_base, check_lora_scale_has_a_lora
    from finetune.evaluation.evaluate import default_suites, print_table, refuse_a_report_grid, run_eval
    from finetune.models.native_resolution import native_resolution

    suites = default_suites(args.suite, args.controlnet)
    check_lora_scale_has_a_lora(args)
    check_subject_options_are_read(args, suites)
    base = base_or_recorded(args)  # --base, else the adapter's record (its header or metadata file: no torch)
    # At the model's own resolution, from its configs: torch and the model loaded (seconds to a minute) before it was said.
    refuse_a_report_grid(suites, args.num_prompts, args.images_per_prompt, native_resolution(base, args.base_config))
    check_local_base(base, args.base_config)
    check_lora_fits_base(args.lora, base, args.base_config)  # a LoRA of another base: from its header, as sample says it
    from finetune.sampling.adapter_records import adapter_base  # pydantic, through the base's finders: after the quick refusals above

    recorded = adapter_base(args.lora, args.controlnet)  # the base the adapter's run recorded (its header or metadata file)
    found = recorded_as_found(recorded, args.lora or args.controlnet) if args.base else base  # without --base, it is the recorded one
    prompt_parts = subject_prompt_parts(suites, args.identifier, args.class_word, args.subject)
    out = Path(args.out) if args.out else default_out(base, args.lora, args.controlnet, suites, args.lora_scale, args.conditioning_scale, found, prompt_parts)
    check_report_path(out)  # before torch and diffusers load (it came after them, 12 s to 20 s on a busy 2-core machine)
    if note := control_kind_note(args.controlnet, suites):
        print(f"note: {note}")
    quiet_weight_progress_bars()  # transformers, then torch and diffusers: after the checks above, which need neither
    from finetune.sampling.prompt_options import PromptSettings, guidance_notes

    for note in guidance_notes([PromptSettings("", None, args.seed, args.guidance, args.steps)]):
        print(f"note: {note}")
    from finetune.outputs.base_names import shared_base_name

    result = run_eval(
        base, args.lora, args.lora_scale, suites, args.num_prompts, args.images_per_prompt,
        args.steps, args.guidance, args.seed, args.identifier, args.subject, args.class_word,
        controlnet=args.controlnet, conditioning_scale=args.conditioning_scale, out=out, base_config=args.base_config,
        # Without --base, by name as shared files name it (finetune.outputs.base_names; an older output's recorded path too): not
        # the path on this machine its run's base_paths.json gave, which no one typed, in a report left in the run folder.
        base_as=None if args.base else shared_base_name(recorded or base),
    )  # fmt: skip
    print_table(result)
    print(f"wrote {out}")
    return 0
