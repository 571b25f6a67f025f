"""The `finetune` command (also `python -m finetune` and `accelerate launch -m finetune`)."""

from __future__ import annotations

import atexit
import functools
import gc
import logging
import os
import signal
import sys
import time
from pathlib import Path

from finetune.checkpoints.run_files import resolve_lora_file
from finetune.cli.arguments import parse_arguments
from finetune.counts import counted
from finetune.data.image_bounds import sample_grid_problem
from finetune.distributed.process_env import first_on_its_machine, machine_name, main_process
from finetune.errors import FinetuneError, one_line, refuse_a_file_in_the_way
from finetune.library_noise import quiet_third_party_warnings, quiet_weight_progress_bars
from finetune.models.native_resolution import native_resolution
from finetune.optim.packages import broken_bitsandbytes_as_one_line
from finetune.progress_lines import progress_as_lines_in_logs
from finetune.sampling.prompt_options import prompts_settings
from finetune.stop_signals import START_OVER, exit_status, signal_of, stop_line, stop_outside_imports


def base_or_recorded(args) -> str:
    """--base, else the base the adapter's training run recorded (named on the console). The adapters are checked first,
    as loading checks them (`check_adapter_paths`; a local --base: `check_local_base`, after the checks that need no
    files): a mistyped one was said only after torch and diffusers had loaded (10 s of CPU). The record is read from the
    LoRA's header or the ControlNet's metadata file (finetune.sampling.adapter_records), so a base it lacks is said before they load too."""
    check_adapter_paths(args)
    if args.base:
        return args.base
    from finetune.sampling.adapter_records import adapter_base, is_absolute_anywhere, recorded_base, recorded_base_config

    base = recorded_base(args.lora, getattr(args, "controlnet", None))
    if args.base_config is None:  # a single-file base loads offline only with the configs its run was given
        args.base_config = recorded_base_config(args.lora, getattr(args, "controlnet", None))
    configs = f" with the configs {args.base_config}" if args.base_config else ""
    recorded = adapter_base(args.lora, getattr(args, "controlnet", None))
    # (a folder moved, or copied from another machine: which base was taken in place of the path recorded; a base recorded
    # by name, as outputs share it, found at the path its run's record gives, or above the adapter)
    if recorded != base and is_absolute_anywhere(recorded):
        recorded_as = f" as {recorded}, not there: found by its trailing parts above the adapter"
    else:
        recorded_as = f" as {recorded}" if recorded != base else ""
    print(f"base model: {base}{configs} (recorded by the adapter's training run{recorded_as}; --base picks another)")
    return base


def check_adapter_paths(args) -> None:
    """--lora and --controlnet (sample, eval, merge) are there and are what they are given as, before torch loads."""
    if args.lora:
        resolve_lora_file(args.lora)
    if getattr(args, "controlnet", None):
        from finetune.controlnet.folder import resolve_controlnet_folder  # yaml and pydantic: loaded where there is one to check

        resolve_controlnet_folder(args.controlnet)


def check_local_base(base: str, base_config: str | None) -> None:
    """A --base folder or file (or the one the adapter recorded) checked from its files as loading checks it
    (finetune.models.model_source). A hub id is left to loading, which looks it up once (a cache search, or requests to the hub)."""
    from finetune.config import ModelConfig  # pydantic: not loaded for --help
    from finetune.models.model_source import locate_base, looks_like_hub_id

    if not looks_like_hub_id(base):
        locate_base(ModelConfig.from_option(base, base_config))


def check_lora_fits_base(lora: str | None, base: str, base_config: str | None) -> None:
    """A --lora trained on another base (its text widths against the base's configs), said before torch loads: it was said
    once the base had loaded, 23 to 25 s in (finetune.formats.lora_base_fit)."""
    if lora:
        from finetune.formats.lora_base_fit import check_lora_base_fit  # safetensors' header reader: where there is a LoRA

        check_lora_base_fit(resolve_lora_file(lora), base, base_config)


def check_lora_scale_has_a_lora(args) -> None:
    """--lora-scale without --lora: refused, not ignored (the images would be the base model's, at no strength asked for)."""
    if args.lora is None and args.lora_scale != 1.0:
        raise FinetuneError("--lora-scale is the LoRA's strength: pass --lora too, or leave it out")


def collect_then_freeze() -> None:
    """The exit's garbage collection, done once, then what is left frozen: the interpreter's last collections walked
    every object torch, diffusers and the model made, again and again (about 2 s of CPU, 4 to 9 s on a busy host,
    between a command's last line and its exit; 0.5 s of CPU so). Collected first, the garbage's finalizers still run
    (a writer in a reference cycle that finishes its file when collected), which a freeze alone would leave unrun.
    The command is done by then: a Ctrl-C or SIGTERM ends the process at once, not with a KeyboardInterrupt's traceback
    from the collection ("Exception ignored in atexit callback")."""
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.SIG_DFL)
    gc.collect()
    gc.freeze()


@functools.cache  # once per process: main() may run many times in one (tests, notebooks)
def collect_then_freeze_at_exit() -> None:
    # Registered before the command runs, so every atexit handler the libraries the command imports register runs
    # first (last in, first out), on a heap not yet frozen.
    atexit.register(collect_then_freeze)


# What running a stopped command again does. Only train continues (its class images where they stopped, a run from its
# checkpoints with --resume); the others make their outputs anew, and make-conditions first needs leave to replace its own.
# train's is said of a stop before its first step only: one from the training loop on names --resume latest (`run_end.next_step_said`).
RERUN_AFTER_A_STOP = {
    "train": "run the command again to continue",
    "sample": "run the command again to start over (every image is made anew, as a new numbered run)",
    "eval": "run the command again to start over (every image is made and scored anew)",
    "make-conditions": "run the command again with --overwrite to start over",
}


def main(argv: list[str] | None = None) -> int:
    collect_then_freeze_at_exit()
    # SIGTERM not silently, as the default handler ends a process; neither stop inside an import (stop_outside_imports).
    signal.signal(signal.SIGTERM, stop_outside_imports)
    previous_sigint = signal.signal(signal.SIGINT, stop_outside_imports)
    command = None
    try:
        args = parse_arguments(argv)  # it imports every command's options (0.3 s on a busy host): a Ctrl-C there is a stop too
        command = args.command
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        quiet_third_party_warnings()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # A bar's redraws in a log file: a line every 30 s (on a terminal: as ever).
        with progress_as_lines_in_logs(), broken_bitsandbytes_as_one_line():
            return COMMANDS[args.command](args)
    except FinetuneError as err:
        # Under `accelerate launch` every process checks the same recipe and files: one line per machine (each
        # machine's launcher stops on it), naming the machine where there are several (a job's merged log).
        if (first_on_its_machine() if err.said_here is None else err.said_here):
            print(f"error: {machine + ': ' if (machine := machine_name()) else ''}{one_line(err)}", file=sys.stderr)
        elif err.said_here is None:
            leave_the_line_to_the_first_process()
        if err.after_said is not None:
            err.after_said()
        return 2
    except KeyboardInterrupt as stop:  # training stops itself cleanly; this is a stop anywhere else (loading, class images, sampling)
        # Every process got it (a terminal's Ctrl-C, a job's SIGTERM): one line for the run, as the training loop's stop
        # says, not one per machine (errors are each machine's own to say: its files, its libraries).
        if main_process():
            print(stop_line(stop, RERUN_AFTER_A_STOP.get(command, START_OVER)), file=sys.stderr)
        return exit_status(signal_of(stop))
    except BrokenPipeError:  # the reader left (`finetune check-data ... | head`): no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's last flush would raise again
        return 141  # as a shell reports a process ended by SIGPIPE
    finally:
        signal.signal(signal.SIGINT, previous_sigint)  # Python's own again, for a caller that goes on (tests, a notebook)


# How long a process that leaves its error line to its machine's first process waits for the launcher to stop it.
FIRST_PROCESS_GRACE = 10.0


def leave_the_line_to_the_first_process() -> None:
    """A process of a launch, not its machine's first, met an error before the processes joined (the recipe, a file): the
    first one meets it too, and says it. Exiting at once, this one could end the launch first: torchrun stops every other
    process as one fails, and the first one, stopped before it said its line, left the run ending in the launcher's report
    alone (1 of 4 launches of two processes here). So it waits, a bounded time, for the launcher's stop."""
    try:
        time.sleep(FIRST_PROCESS_GRACE)
    except KeyboardInterrupt:  # the launcher's SIGTERM once the first process failed (or a Ctrl-C): the line is the first's
        pass


def _train(args) -> int:
    from finetune.cli.train_command import run_train_command

    return run_train_command(args)


def check_output_folder(out: Path, what: str, holds: str, is_file: bool = False) -> None:
    """Before anything loads or is made: `out` (with `is_file`, the folder it goes in) is, or can become, a folder."""
    refuse_a_file_in_the_way(out.parent if is_file else out, holds, f"{what} {out}")


def _sample(args) -> int:
    if args.condition and len(args.condition) > 1:
        raise FinetuneError("--condition takes one image, used for every prompt: sample each conditioning image in its own run")
    check_lora_scale_has_a_lora(args)
    if args.device == "cpu" and args.precision == "fp16":  # wrong together on any machine: said before torch loads, as inference_placement says it
        raise FinetuneError("--precision fp16 needs a GPU: on a CPU use fp32 or bf16")
    check_output_folder(Path(args.out), "--out", "the images and grid")
    def check_grid(resolution: int | None) -> None:
        if resolution and (problem := sample_grid_problem(args.num_images, len(args.prompt), resolution, args.controlnet is not None)):
            raise FinetuneError(problem)

    check_grid(args.resolution)  # before the base is looked for
    if args.controlnet or args.condition or args.conditioning_scale is not None:
        from finetune.controlnet.folder import check_control_options  # yaml and pydantic: loaded where there are options to check

        check_control_options(args.controlnet, args.condition[0] if args.condition else None, args.conditioning_scale)
    prompts_settings(args.prompt, args.negative_prompt, args.seed, args.guidance, args.steps, args.sampler)  # before the base is looked for
    base = base_or_recorded(args)
    if args.resolution is None:  # the model's own, from its configs (where they cannot be read, once it loads: finetune.sampling.inference)
        check_grid(native_resolution(base, args.base_config))
    check_local_base(base, args.base_config)
    check_lora_fits_base(args.lora, base, args.base_config)
    quiet_weight_progress_bars()  # transformers loads with torch: after the checks, so a refusal stays quick
    from finetune.sampling.inference import SampleRequest, sample_to_folder  # torch and diffusers: after the checks above, which need neither

    request = SampleRequest(
        base=base,
        base_config=args.base_config,
        lora=args.lora,
        lora_scale=args.lora_scale,
        prompts=args.prompt,
        negative_prompt=args.negative_prompt,
        num_images=args.num_images,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        sampler=args.sampler,
        resolution=args.resolution,
        output_dir=Path(args.out),
        controlnet=args.controlnet,
        condition=args.condition[0] if args.condition else None,
        conditioning_scale=args.conditioning_scale,
        device=args.device,
        precision=args.precision,
    )
    written = sample_to_folder(request)
    # The files by name: a run's number is new each time (finetune/sampling/sample_files.py), so it is read here. Many images
    # (--num-images 64 with several prompts) by their first and last, in one line a person reads.
    names = [path.name for path in written[:-1]]
    images = ", ".join(names) if len(names) <= 4 else f"{names[0]}, {names[1]}, ... {names[-1]}"
    print(f"wrote {counted(len(written) - 1, 'image')} and a grid: {written[-1]} (images beside it: {images})")
    return 0


def _make_tiny_model(args) -> int:
    from finetune.outputs.folders import check_replaceable

    # Not into a folder with contents unasked: a mistyped path to a trained pipeline had its weights replaced by random ones.
    output_dir = Path(args.output_dir).absolute()
    check_replaceable(output_dir, args.overwrite, "make-tiny-model output")
    quiet_weight_progress_bars()
    from finetune.models.tiny_model import make_tiny_model
    from finetune.outputs.atomic_files import folder_written_whole  # torch and diffusers: after the check

    with folder_written_whole(output_dir) as written:  # Ctrl-C while the model was written left a hidden half of it beside the output
        make_tiny_model(written, preset=args.preset, seed=args.seed, prediction_type=args.prediction_type)
    print(f"wrote a {args.preset} Stable Diffusion pipeline to {args.output_dir}")
    return 0


def _make_sample_data(args) -> int:
    from finetune.toyworld.sample_data import make_sample_data

    for folder in make_sample_data(args.output_dir):
        print(f"wrote {folder}")
    return 0


def _make_world_data(args) -> int:
    from finetune.toyworld.sample_data import check_world_data_arguments, make_world_data

    check_world_data_arguments(Path(args.output_dir), args.num_images, args.partial_captions)
    folder = make_world_data(args.output_dir, args.num_images, args.seed, args.include_held_out,
                             partial_captions=args.partial_captions, conditioning=args.conditioning)
    print(f"wrote {counted(args.num_images, 'image')} to {folder}")
    return 0


def _export_base(args) -> int:
    from finetune.outputs.folders import export_base_source

    export_base_source(Path(args.source), Path(args.destination), args.overwrite)  # before torch loads; export_fp16 checks again
    quiet_weight_progress_bars()
    from finetune.outputs.pipeline_io import export_fp16

    print(f"wrote {export_fp16(Path(args.source), Path(args.destination), overwrite=args.overwrite)}")
    return 0


def _export(args) -> int:
    output = Path(args.output)
    check_output_folder(output, "export output", "the LoRA and its model card", is_file=output.suffix.lower() == ".safetensors")
    resolve_lora_file(args.input)
    from finetune.formats.lora_export import export_lora  # torch: after the checks above
    path, card, images = export_lora(Path(args.input), Path(args.output), args.to, overwrite=args.overwrite, precision=args.precision)
    print(f"wrote {path} ({args.to} layout{', ' + args.precision if args.precision else ''}), its model card {card}" + "".join(f", {i}" for i in images))
    return 0


def _export_checkpoint(args) -> int:
    from finetune.models.model_source import resolve_pipeline_folder  # pydantic: not loaded for --help
    from finetune.outputs.folders import check_export_checkpoint_output

    from finetune.formats.original_layout import check_sd1_shape

    # Before torch loads (a pipeline of another shape was said after its import, 13 s); export_checkpoint checks them again.
    folder = resolve_pipeline_folder(Path(args.input))
    check_export_checkpoint_output(folder, Path(args.output), args.overwrite)
    check_sd1_shape(folder)
    quiet_weight_progress_bars()
    from finetune.formats.single_file_export import export_checkpoint

    path, notes = export_checkpoint(Path(args.input), Path(args.output), args.precision, overwrite=args.overwrite)
    print(f"wrote {path} ({path.stat().st_size / 1e6:,.1f} MB{', ' + args.precision if args.precision else ''})")
    for note in notes:
        print(f"note: {note}")
    return 0


def _merge(args) -> int:
    from finetune.outputs.folders import check_merge_output

    check_merge_output(Path(args.output_dir), Path(args.lora), args.overwrite)  # before the LoRA's base is read (torch)
    base = base_or_recorded(args)
    check_local_base(base, args.base_config)
    check_lora_fits_base(args.lora, base, args.base_config)
    quiet_weight_progress_bars()
    from finetune.formats.merge import merge_lora  # torch and diffusers: after the checks above, which need neither

    print(f"wrote {merge_lora(base, args.lora, args.strength, Path(args.output_dir), args.base_config, args.overwrite, args.precision)}")
    return 0


def _make_conditions(args) -> int:
    from finetune.console import warn
    from finetune.controlnet.conditions import images_left_out, make_condition_folders
    from finetune.controlnet.made_folders import made_folder_lines

    options = {"canny": dict(low=args.low, high=args.high, sigma=args.sigma), "mask": dict(threshold=args.threshold)}.get(args.kind, {})
    check_output_folder(Path(args.output_dir), "output_dir", "the conditioning images and metadata.jsonl")
    made = make_condition_folders(args.input_dir, args.output_dir, args.kind, overwrite=args.overwrite, **options)
    for folder, count, uncaptioned in made:
        print(f"wrote {counted(count, args.kind + ' conditioning image')} and metadata.jsonl to {folder}")
        if uncaptioned:
            print(f"note: {counted(uncaptioned, 'image')} had no caption (.txt or metadata.jsonl) and train with an empty prompt")
    for line in images_left_out(args.input_dir, args.output_dir, [folder for folder, _, _ in made]):
        warn(line)
    for line in made_folder_lines(args.output_dir, made):  # the data.folders entries of subfolders, then the train command: last
        print(line)
    return 0


def _check_data(args) -> int:
    from finetune.data_check.command import run_check_data_command

    return run_check_data_command(args)


def _eval(args) -> int:
    from finetune.evaluation.command import run_eval_command

    return run_eval_command(args)


def _bench(args) -> int:
    from finetune.bench import run_bench_command

    return run_bench_command(args)


def _demo(args) -> int:
    from finetune.demo.page import run_demo_command

    return run_demo_command(args)


COMMANDS = {
    "train": _train,
    "sample": _sample,
    "make-tiny-model": _make_tiny_model,
    "make-sample-data": _make_sample_data,
    "make-world-data": _make_world_data,
    "export-base": _export_base,
    "export": _export,
    "export-checkpoint": _export_checkpoint,
    "merge": _merge,
    "make-conditions": _make_conditions,
    "check-data": _check_data,
    "eval": _eval,
    "bench": _bench,
    "demo": _demo,
}
