"""The `finetune` command's arguments: one subparser per command, and one function per group of options that several
commands take (the values' types: finetune/cli/argument_types.py; the handlers: finetune/cli/main.py)."""

from __future__ import annotations

import argparse
import re

from finetune.cli.argument_types import finite_float, lora_strength, number_or_text, positive_int, sample_side, sampler_option, sampling_steps, seed_number
from finetune.cli.option_advice import options_meant, override_for, recipe_method, spaced_override
from finetune.controlnet.condition_kinds import CANNY_HIGH, CANNY_LOW, CANNY_SIGMA, KINDS, MASK_THRESHOLD, MAX_CANNY_SIGMA
from finetune.sampling.samplers import DEFAULT_SAMPLER, SAMPLER_CHOICES


EXAMPLES = """examples:
  finetune train recipes/quickstart.yaml
  finetune train recipes/lora.yaml optimizer.lr=5e-5 train.max_steps=2000
  accelerate launch --config_file accelerate_config.yaml -m finetune train recipes/lora.yaml
  finetune train recipes/lora.yaml --resume latest
  finetune check-data recipes/lora.yaml data.image_dir=my_photos data.bucketing.enabled=true
  finetune sample --base finetune/assets/toyworld-base --lora outputs/quickstart --prompt "a large orange star on a gray background"
  finetune export outputs/quickstart outputs/webui --to kohya
  finetune export-checkpoint outputs/dreambooth outputs/webui/dreambooth.safetensors --precision fp16
  finetune merge --base finetune/assets/toyworld-base --lora outputs/quickstart --strength 0.8 outputs/merged
  finetune make-tiny-model outputs/tiny-sd
  finetune make-conditions my_photos my_controlnet_data --kind canny
  finetune eval --base finetune/assets/toyworld-base --lora outputs/quickstart --suite style
  finetune bench --preset medium --steps 10 --out outputs/bench.json
  finetune demo --adapters outputs
"""


class OneLoRA(argparse.Action):
    """--lora given once: argparse would keep the last of two silently, and the user would get one of the LoRAs asked for."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} is given twice: these commands take one LoRA (the demo applies several together; to merge "
                         "several, merge one, then merge the next into that output given as --base)")  # fmt: skip
        setattr(namespace, self.dest, values)


RECORDED_BASE_HELP = " (default: the base the --lora or --controlnet run recorded)"
WEIGHT_PRECISIONS = ["fp32", "fp16", "bf16"]  # of weights written or sampled with (sampling's --precision also takes auto)


class ExamplesKeptWhole(argparse.HelpFormatter):
    """Wraps descriptions and notes line by line, but keeps indented lines (example commands) whole: argparse's
    default formatter ran an epilog's example into the text around it and broke it mid-command, so it could not
    be copied; RawDescriptionHelpFormatter wrapped nothing, leaving a description one line of 400 characters."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(line if not line or line.startswith(" ") else super(ExamplesKeptWhole, self)._fill_text(line, width, indent)
                         for line in text.splitlines())  # fmt: skip


class NegativeNumbersAsValues(argparse.ArgumentParser):
    """A parser that reads any negative number as a value: argparse's own reads -2 and -0.5 so, but -1e30 and -2E1 as
    options (`--strength -1e30`: "expected one argument", where `--strength=-1e30` worked). No option of finetune's
    looks like a number, so none is mistaken for one; the subcommands' parsers are of this class too (add_subparsers)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def add_base_options(parser: argparse.ArgumentParser, default_help: str) -> None:
    """--base and --base-config, as sample, merge, eval and demo take them (training: model.pretrained and
    model.single_file_config); each finds a base without --base, the one `default_help` names."""
    parser.add_argument("--base", help="base model: hub id, diffusers folder or .safetensors file" + default_help)
    parser.add_argument(
        "--base-config",
        help="for a .safetensors/.ckpt base: a diffusers folder or hub id with the configs that describe it (needed offline)",
    )


def add_placement_options(parser: argparse.ArgumentParser) -> None:
    """--device and --precision, as sample and demo take them (finetune/sampling/placement.py)."""
    parser.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto", help="where to sample (default: the GPU if there is one)")
    parser.add_argument("--precision", choices=["auto", *WEIGHT_PRECISIONS], default="auto",
                        help="the model's weights while sampling (default: fp16 on CUDA, fp32 elsewhere)")  # fmt: skip


def add_recipe_arguments(parser: argparse.ArgumentParser, recipe_help: str, overrides_example: str, optional: bool = False) -> None:
    """A recipe and its dotted key=value overrides, as train and check-data take them (parse_arguments adds the
    overrides typed after an option)."""
    parser.add_argument("recipe", nargs="?" if optional else None, help=recipe_help)
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value", help=f"recipe overrides, e.g. {overrides_example}")


def add_lora_option(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """--lora, as sample, merge and eval take it: one LoRA, a file or the run folder that holds it (OneLoRA)."""
    parser.add_argument("--lora", action=OneLoRA, required=required, help="LoRA file, or a training output folder holding pytorch_lora_weights.safetensors")


def add_seed_option(parser: argparse.ArgumentParser, seeds_what: str) -> None:
    """--seed, a seed as a recipe takes one (`seed_number`), 0 unless given; `seeds_what` says what it decides."""
    parser.add_argument("--seed", type=seed_number, default=0, help=f"{seeds_what} (default 0)")


def add_overwrite_option(parser: argparse.ArgumentParser, replaces: str) -> None:
    """--overwrite, the switch each command that writes somewhere takes to replace what is there; `replaces` says what goes."""
    parser.add_argument("--overwrite", action="store_true", help=replaces)


def add_file_precision_option(parser: argparse.ArgumentParser, shared_as: str, default_said: str) -> None:
    """--precision of the weights export and export-checkpoint write: as their input holds them unless given."""
    parser.add_argument("--precision", choices=WEIGHT_PRECISIONS,
                        help=f"the weights' precision: fp16 halves the file, as most shared {shared_as} are (default: {default_said})")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = NegativeNumbersAsValues(
        prog="finetune",
        description="Fine-tune Stable Diffusion on your own images: LoRA, DreamBooth, ControlNet.",
        epilog=EXAMPLES,
        formatter_class=ExamplesKeptWhole,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser(
        "train",
        help="train with a YAML recipe",
        description="Train with a YAML recipe. Any recipe key can be overridden as dotted.key=value.",
        epilog="example:\n  finetune train recipes/lora.yaml optimizer.lr=1e-4 data.image_dir=my_photos",
    )
    add_recipe_arguments(train, "path of a recipe, e.g. recipes/lora.yaml", overrides_example="train.max_steps=500")
    train.add_argument("--resume", metavar="CHECKPOINT", help="'latest' or a checkpoints/checkpoint-N folder to continue from")
    add_overwrite_option(train, "start over in an output_dir that holds an earlier run (deletes its checkpoints, samples, logs and outputs: its "
                                "LoRA file, pipeline/, unet/ or controlnet/ folder, except one the new run starts from, e.g. lora.init_from)")  # fmt: skip

    sample = commands.add_parser(
        "sample",
        help="generate images from a base model plus a trained adapter",
        description="Generate images from a base model, optionally with a trained LoRA and/or ControlNet, and save them "
        "with a grid (with a ControlNet each row starts with the conditioning image).",
        epilog="example:\n  finetune sample --base finetune/assets/toyworld-base --controlnet outputs/controlnet "
        '--condition mask.png --prompt "a small red circle on a blue background, top left"',
    )
    add_base_options(sample, default_help=RECORDED_BASE_HELP)
    add_lora_option(sample)
    sample.add_argument("--lora-scale", type=lora_strength, default=1.0, help="LoRA strength (default 1.0; one: compare several in finetune demo)")
    sample.add_argument("--controlnet", help="ControlNet folder (config.json + weights), or a controlnet training output folder")
    sample.add_argument("--condition", action="append", help="conditioning image for --controlnet (edges, mask, ...), used for every prompt")
    sample.add_argument("--conditioning-scale", type=finite_float, default=None, help="ControlNet strength (default 1.0; 0 = the base model alone)")
    sample.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several); may end in --n NEGATIVE --d SEED --l GUIDANCE --s STEPS --ss SAMPLER, quoted with it")
    sample.add_argument("--negative-prompt", default=None, help="what to steer away from, for every prompt without its own --n (acts only at --guidance above 1)")
    sample.add_argument("--num-images", type=positive_int, default=4, help="images per prompt (default 4; seeds seed..seed+N-1, from a prompt's own --d if it has one)")
    add_seed_option(sample, "seed of each prompt's first image")
    sample.add_argument("--steps", type=sampling_steps, default=25, help="sampling steps (default 25)")
    sample.add_argument("--sampler", type=sampler_option, default=DEFAULT_SAMPLER, metavar="SAMPLER",
                        help=f"the sampler: {SAMPLER_CHOICES} (default {DEFAULT_SAMPLER}; each keeps the model's prediction type and noise schedule)")
    sample.add_argument("--guidance", type=finite_float, default=7.5, help="classifier-free guidance scale (default 7.5; 1 or below: none)")
    sample.add_argument("--resolution", type=sample_side, default=None, help="image size (default: the model's)")
    sample.add_argument("--out", default="outputs/samples", help="output folder (default outputs/samples)")
    add_placement_options(sample)

    tiny = commands.add_parser(
        "make-tiny-model",
        help="write a small random Stable Diffusion pipeline (for tests and benchmarks)",
        description="Write a complete diffusers Stable Diffusion pipeline with tiny random weights, offline, in seconds.",
        epilog="examples (then model.pretrained=outputs/tiny-sd in a recipe, or --base outputs/tiny-sd):\n  finetune make-tiny-model outputs/tiny-sd\n"
        "  finetune make-tiny-model outputs/base/init --preset world   # the toy-world base's first stage (make base-model)",
    )
    tiny.add_argument("output_dir", help="folder to write the pipeline to (model_index.json and one subfolder per part)")
    tiny.add_argument("--preset", choices=["tiny", "world", "medium"], default="tiny",
                      help="tiny (~1M UNet params), world (the toy-world base architecture) or medium (SD1.5 block pattern, ~19M)")
    add_seed_option(tiny, "seed of the random weights")
    tiny.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default="epsilon",
                      help="what the scheduler says the UNet predicts (default epsilon; v_prediction as SD2.x's 768 px models)")
    add_overwrite_option(tiny, "replace everything in an existing output folder (the folder itself is kept)")

    data = commands.add_parser(
        "make-sample-data",
        help="regenerate the sample datasets under datasets/",
        description="Write the sample datasets (striped/ and star/, from the toy world) into a folder. A striped/ or star/ "
                    "already there is rewritten only where every file in it is the sample's own (nothing of yours is written over).",
        epilog="example:\n  finetune make-sample-data   # datasets/star and datasets/striped, as shipped",
    )
    data.add_argument("output_dir", nargs="?", default="datasets", help="folder to write star/ and striped/ into (default datasets)")

    world = commands.add_parser(
        "make-world-data",
        help="write toy-world images with captions (the base model's pretraining data)",
        description="Write toy-world images with .txt captions and metadata.jsonl.",
        epilog="examples:\n  finetune make-world-data outputs/world/train --num-images 20000 --seed 0   # the base's pretraining data\n"
        "  finetune make-world-data outputs/world/control --num-images 10000 --seed 3 --conditioning   # a ControlNet's, with masks",
    )
    world.add_argument("output_dir", help="a new or empty folder")
    world.add_argument("--num-images", type=int, default=20000, help="images to write (default 20000, ~160 MB)")
    add_seed_option(world, "the same seed writes the same images")
    world.add_argument("--include-held-out", choices=["no", "only_shape", "only_style", "all"], default="no",
                       help="no (default): held-in only (UNet pretraining); only_shape: solid stars only (a DreamBooth subject); "
                       "only_style: striped shapes only (a new-style LoRA's data); all: stars and stripes too (VAE pretraining)")
    world.add_argument("--partial-captions", type=float, default=0.0, metavar="SHARE",
                       help="share of images captioned with only some attributes ('a red shape, top left'; default 0)")
    world.add_argument("--conditioning", action="store_true",
                       help="also write shape masks (conditioning/NNNN.png) for ControlNet training")

    export = commands.add_parser(
        "export-base",
        help="save a trained pipeline compactly (fp16 safetensors), e.g. to ship the toy-world base",
        description="Copy a diffusers pipeline folder, converting its weights to fp16 safetensors.",
        epilog="example:\n  finetune export-base outputs/base/unet3 finetune/assets/toyworld-base --overwrite   # as make base-model ships it",
    )
    export.add_argument("source", help="a diffusers pipeline folder, or a full run's folder holding pipeline/ (e.g. outputs/base/unet3)")
    export.add_argument("destination", help="a new folder for the fp16 copy")
    add_overwrite_option(export, "replace everything in an existing destination folder (the folder itself is kept)")

    lora_export = commands.add_parser(
        "export",
        help="convert a LoRA between diffusers and kohya (webui/ComfyUI) layouts, with a model card",
        description="Convert a LoRA file to the kohya layout (AUTOMATIC1111/Forge webui, ComfyUI, sd-scripts) or to "
        "diffusers' layout, keeping every module's rank and alpha. Writes the file, its metadata and a model card "
        "(with the newest sample grid of the training folder): <name>.md and <name>.preview.png beside a kohya file, "
        "README.md in a diffusers folder.",
        epilog="example:\n  finetune export outputs/lora outputs/webui --to kohya   # writes outputs/webui/lora.safetensors",
    )
    lora_export.add_argument("input", help="a LoRA .safetensors file (either layout) or a training output folder")
    lora_export.add_argument("output", help="a .safetensors path, or a folder for the file and its model card")
    lora_export.add_argument("--to", required=True, choices=["kohya", "diffusers"], help="layout to write")
    add_overwrite_option(lora_export, "replace the file and its model card if they exist")
    add_file_precision_option(lora_export, shared_as="LoRAs", default_said="the input's; training writes fp32")

    checkpoint_export = commands.add_parser(
        "export-checkpoint",
        help="write a full pipeline as one webui/ComfyUI checkpoint file (SD1.x's original layout)",
        description="Convert an SD1.x-shaped diffusers pipeline (a full or DreamBooth-full run, or finetune merge's output) "
        "to one .safetensors file in the original Stable Diffusion layout (model.diffusion_model.*, first_stage_model.*, "
        "cond_stage_model.*) that AUTOMATIC1111/Forge webui, ComfyUI and model sites load, with the run's metadata. "
        "A LoRA is folded into its base with finetune merge first.",
        epilog="example:\n  finetune export-checkpoint outputs/dreambooth outputs/webui/dreambooth.safetensors --precision fp16",
    )
    checkpoint_export.add_argument("input", help="a pipeline folder (model_index.json), or a run or checkpoint folder holding pipeline/")
    checkpoint_export.add_argument("output", help="the .safetensors file to write")
    add_file_precision_option(checkpoint_export, shared_as="checkpoints", default_said="as the pipeline holds them")
    add_overwrite_option(checkpoint_export, "replace the file if it exists")

    merge = commands.add_parser(
        "merge",
        help="fold a LoRA into its base model and save a full pipeline",
        description="Add a LoRA (either layout) into the base UNet and, if it has one, text encoder at the given "
        "strength, and write a complete diffusers pipeline that needs no LoRA loading.",
        epilog="example:\n  finetune merge --base stable-diffusion-v1-5/stable-diffusion-v1-5 --lora outputs/lora --strength 0.8 outputs/merged",
    )
    merge.add_argument("output_dir", help="folder for the merged pipeline")
    add_base_options(merge, default_help=" (default: the base the --lora run recorded)")
    add_lora_option(merge, required=True)
    merge.add_argument("--strength", type=finite_float, default=1.0, help="LoRA strength, as --lora-scale in sampling (default 1.0)")
    add_overwrite_option(merge, "replace the contents of an existing output folder")
    merge.add_argument("--precision", choices=WEIGHT_PRECISIONS, default="fp32", help="weights of the merged pipeline (default fp32; fp16 halves it)")

    conditions = commands.add_parser(
        "make-conditions",
        help="make ControlNet conditioning images (canny edges, luminance, a mask) and a metadata.jsonl",
        description="Write a ControlNet training folder from a folder of images: the images, conditioning/<name>.png "
        "(canny: edges, white on black; luminance: a grayscale depth-like map; mask: pixels far from the border's "
        "colour, for the toy world) and a metadata.jsonl with file_name, conditioning_file_name and text (captions "
        "from the input's metadata.jsonl, metadata.csv or .txt files). Each subfolder holding images is written to the output's subfolder "
        "of its name, for data.folders.",
        epilog="example, then training on the folder:\n  finetune make-conditions my_photos my_controlnet_data --kind canny\n"
        "  finetune train recipes/controlnet.yaml data.image_dir=my_controlnet_data",
    )
    conditions.add_argument("input_dir", help="folder of images (with .txt captions, or a metadata.jsonl or metadata.csv)")
    conditions.add_argument("output_dir", help="training folder to write (may be input_dir itself)")
    conditions.add_argument("--kind", required=True, choices=list(KINDS), help="which conditioning image to make (see above)")
    conditions.add_argument("--low", type=float, default=CANNY_LOW, help=f"canny: weak edge threshold, in colour levels 0-255 (default {CANNY_LOW:g})")
    conditions.add_argument("--high", type=float, default=CANNY_HIGH, help=f"canny: strong edge threshold, in colour levels 0-255 (default {CANNY_HIGH:g})")
    conditions.add_argument("--sigma", type=float, default=CANNY_SIGMA,
                            help=f"canny: Gaussian blur before the gradients, in pixels, 0 to {MAX_CANNY_SIGMA:g} (default {CANNY_SIGMA})")  # fmt: skip
    conditions.add_argument("--threshold", type=float, default=MASK_THRESHOLD,
                            help=f"mask: RGB distance from the border colour that counts as shape (default {MASK_THRESHOLD:g})")  # fmt: skip
    add_overwrite_option(conditions, "replace what the output folder holds: an earlier run's conditioning images, its metadata.jsonl, files of the images' names")

    check = commands.add_parser(
        "check-data",
        help="check a dataset the way training reads it: counts, sizes, buckets, bad or odd images, captions",
        description="Decode every image of a recipe's data (or of --image-dir) as training will and report counts, "
        "sizes, aspect-ratio buckets, and problems: fatal ones (unreadable, truncated, too small, no caption) that "
        "stop training, warnings (upscaled images, duplicates), and conversions (EXIF rotation, CMYK, 16-bit, "
        "transparency, palette). Exit status 1 when training would stop.",
        epilog="examples:\n  finetune check-data recipes/lora.yaml data.image_dir=my_photos\n"
        "  finetune check-data --image-dir my_photos --resolution 512",
    )
    add_recipe_arguments(check, "a recipe, e.g. recipes/lora.yaml (default: data settings' defaults)", overrides_example="data.bucketing.enabled=true", optional=True)
    check.add_argument("--image-dir", help="folder of images to check (instead of the recipe's data.image_dir)")
    check.add_argument("--resolution", type=number_or_text, help="training resolution (instead of the recipe's data.resolution)")

    from finetune.evaluation.command import add_eval_parser

    add_eval_parser(commands)
    from finetune.bench import add_bench_parser

    add_bench_parser(commands)
    from finetune.demo.page import add_demo_parser

    add_demo_parser(commands)
    for command in commands.choices.values():  # also those that bench, eval and demo register
        command.formatter_class = ExamplesKeptWhole
    return parser


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """`key=value` overrides may also come after options (`train R --resume latest train.max_steps=5`):
    argparse stops collecting a positional list at the first option, so the rest are added here."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    command = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction)).choices.get(args.command)
    if not hasattr(args, "overrides"):
        if extra and command is not None:  # `sample --num_images 2`, as diffusers spells it: said by sample's own parser, with its option
            command.error(f"unrecognized arguments: {' '.join(extra)}{options_meant(command, extra)}")
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args
    if extra:
        if (option := next((i for i, item in enumerate(extra) if item.startswith("--")), None)) is not None:
            # `--max_train_steps 100`, as diffusers' scripts take their settings: said by the command's own parser, with the key
            command.error(f"unrecognized arguments: {' '.join(extra)}: {override_for(extra[option:], recipe_method(args, extra), args.command)}")
        if any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if problem := spaced_override(args.overrides):
        command.error(problem)
    return args
