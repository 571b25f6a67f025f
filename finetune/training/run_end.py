"""The end of a run that trained to its last step: its outputs, its last checkpoint and its final samples, in that
order, so that a kill at any point leaves what a resume needs. The last checkpoint says which of the outputs and the
final samples are still to come (`OUTPUTS_PENDING`, `VALIDATION_PENDING`) until they are on disk: a run killed after it
(SIGKILL while the final grid is drawn, a second Ctrl-C while the outputs are written) is finished by `--resume latest`,
which writes what is missing, where it had refused with "nothing left to train" and the last grid was never drawn."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
from pathlib import Path
from typing import Callable

from finetune.checkpoints.earlier_run import RUN_ENTRIES, RUN_OUTPUTS, finish_a_finished_runs_saves
from finetune.checkpoints.run_files import STATE_FILE, checkpoint_folder, checkpoint_step, read_state, resolve_resume
from finetune.config.run_recipe import RUN_RECIPE
from finetune.console import say
from finetune.distributed.process_env import main_process
from finetune.errors import FinetuneError
from finetune.outputs.atomic_files import atomic_write_text, outputs_written, remove_leftover_partials
from finetune.stop_signals import signal_name, with_next_step

# A checkpoint's state: its step's validation is still to draw, by its resume (the key is named from when only a stop's recorded it).
VALIDATION_PENDING = "stopped_before_validation"
# ...and the train logs of its step, written again where its resume draws that step's grid again (TensorBoard purges from it).
LOGGED_AT_STEP = "logged_at_step"
# A finished run's last checkpoint: the run's outputs were not written (cut short by a second Ctrl-C, or a full disk).
OUTPUTS_PENDING = "outputs_pending"
WHAT_IS_PENDING = {OUTPUTS_PENDING: "its outputs", VALIDATION_PENDING: "its final samples"}


def final_samples_wanted(recipe, method, held_out: list) -> bool:
    """Whether the run's last validation draws anything (a grid, or the held-out images' loss)."""
    return bool(recipe.validation.all_prompts) or bool(held_out) or method.draws_without_prompts


def left_to_finish(checkpoint: Path | None, max_steps: int | None) -> list[str]:
    """The keys of what the end of a run is still to write (`WHAT_IS_PENDING`), where `checkpoint` is the last one of a
    run that trained to step `max_steps` (this run's last step too); [] for any other checkpoint."""
    if checkpoint is None or max_steps is None or checkpoint_step(checkpoint) != max_steps:
        return []
    state = read_state(checkpoint)
    return [key for key in WHAT_IS_PENDING if state.get("max_steps") == max_steps and state.get(key)]


def resume_limit(checkpoint: Path | None, max_steps: int | None) -> int | None:
    """The train.max_steps a resume of `checkpoint` is held to (`checkpoint.check_resumable`: nothing left to train at or past
    it), as train() and `finetune train`'s early check both read it: None without a resume, and for the last checkpoint of a
    run whose end a kill cut short, resumed to finish that end."""
    return None if checkpoint is None or left_to_finish(checkpoint, max_steps) else max_steps


@contextlib.contextmanager
def next_step_said(output_dir: Path, checkpoints_dir: Path, max_steps: int, resumed_from: Path | None = None):
    """A second stop during the training loop or the run's end (raised at once, out of `finetune train`): its line says what
    is left, read from what is on disk, where it said "run the command again to continue", which without --resume is refused
    (the output_dir holds an earlier run), and with nothing left to train did nothing. `resumed_from`: the checkpoint this
    run resumed from, which the same command resumes again while the run has kept none of its own."""
    try:
        yield
    except KeyboardInterrupt as stop:
        try:
            next_step = _what_is_left(output_dir, checkpoints_dir, max_steps, resumed_from)
        except FinetuneError:  # a checkpoint's state the stop left unreadable: the stop is still the line to say
            next_step = "continue with --resume latest"
        raise with_next_step(stop, next_step)


def _what_is_left(output_dir: Path, checkpoints_dir: Path, max_steps: int, resumed_from: Path | None = None) -> str:
    latest = resolve_resume("latest", checkpoints_dir)  # a checkpoint the stop left before its rename too, as a resume takes it
    again = resume_command(output_dir)
    if latest is None and resumed_from is not None and (pending := left_to_finish(resumed_from, max_steps)):
        return _end_left_from_a_copy(output_dir, resumed_from, pending)
    if latest is None and any((output_dir / name).exists() for name in RUN_OUTPUTS):
        return f"no checkpoint was kept; the run's outputs are in {output_dir} (`finetune sample` draws from them)"
    if latest is None and resumed_from is not None:  # a checkpoint copied from another folder: "start over" was not so
        return (f"no checkpoint of this run was kept yet: run the same command again (--resume {resumed_from}) to continue "
                f"from its step {checkpoint_step(resumed_from)} again")  # fmt: skip
    if latest is None:
        return "no checkpoint and no outputs were kept: run the command again to start over"
    if checkpoint_step(latest) < max_steps:
        return f"continue with --resume latest ({again}): it trains again from {checkpoint_folder(checkpoints_dir, checkpoint_step(latest))}"
    if pending := left_to_finish(latest, max_steps):
        return f"the run trained to its end; --resume latest writes {' and '.join(WHAT_IS_PENDING[key] for key in pending)}, without training ({again})"
    return f"the run trained to its end and its outputs are in {output_dir}: nothing is left to do"


def _end_left_from_a_copy(output_dir: Path, resumed_from: Path, pending: list[str]) -> str:
    """What a second stop leaves of a cut-short end resumed from a checkpoint copied from another folder. That copy is only
    read (`finish_cut_short`), so its `pending` still names the outputs once they are in output_dir: they are looked for
    there, where "no checkpoint was kept; the run's outputs are in ..." hid that the final samples were still to draw."""
    again, option = resume_command(output_dir, resumed_from), _resume_option(resumed_from)
    if not any((output_dir / name).exists() for name in RUN_OUTPUTS):
        return f"the run trained to its end; --resume {option} writes {' and '.join(WHAT_IS_PENDING[key] for key in pending)}, without training ({again})"
    if VALIDATION_PENDING in pending:
        return (f"the run's outputs are in {output_dir}; its final samples are still to draw: --resume {option} draws them, "
                f"without training ({again})")  # fmt: skip
    return f"the run trained to its end and its outputs are in {output_dir}: nothing is left to do"


def finish_training(result, stop, output_dir: Path, checkpoints_dir: Path, save_outputs: Callable[[Path], list[Path]],
                    save_checkpoint: Callable[..., None], validate: Callable[[int], Path | None], samples_wanted: bool) -> None:  # fmt: skip
    """Collective: the trainer's end, once `result.final_step` is the run's last. A Ctrl-C or SIGTERM now skips the last
    samples but waits for the outputs (a second one interrupts). Outputs first: a kill later leaves them, one before leaves
    no last checkpoint (with it, --resume latest had nothing to train)."""
    written = False
    with next_step_said(output_dir, checkpoints_dir, result.final_step), stop, outputs_written(output_dir, checkpoints_dir):  # a stop in the last step skips the samples
        try:
            result.saved_files = save_outputs(output_dir)
            written = True
        finally:  # whatever happens while writing the outputs, the trained state goes to disk (a longer run resumes it)
            with _written_outputs_said(result.saved_files if written else []):
                save_checkpoint(validation_pending=samples_wanted, outputs_pending=not written)
        stopped = stop.agreed_now()  # collective: once, on every process
        if stopped and samples_wanted:
            _say_skipped(result, stop.signal, output_dir)
        elif not stopped:
            with stop.said_at_once(_finishing_the_samples(result.final_step, output_dir)) if samples_wanted else contextlib.nullcontext(), \
                    final_grid_said(output_dir):
                validate(result.final_step)  # the outputs' paths are the result's (`finetune train` ends with them: output: PATH)
            if samples_wanted:
                _mark_written(checkpoint_folder(checkpoints_dir, result.final_step), VALIDATION_PENDING)


def finish_cut_short(result, stop, output_dir: Path, checkpoints_dir: Path, save_outputs: Callable[[Path], list[Path]],
                     validate: Callable[[int], Path | None], pending: list[str], checkpoint: Path) -> None:  # fmt: skip
    """Collective: the end of a run resumed from its last checkpoint (`checkpoint`, `left_to_finish`: `pending`), as
    `finish_training` would have ended it, without training or saving again. Each part written is marked in that
    checkpoint's state where it is this run's; one copied from elsewhere is only read (as `finish_a_finished_runs_saves`
    reads it): it was looked for in this run's checkpoints/, and the outputs written were followed by "checkpoint ... is
    damaged" for a folder that was never there."""
    ours = checkpoint.parent.resolve() == checkpoints_dir.resolve()
    again_from = None if ours else checkpoint  # this run keeps no checkpoint of its own: `--resume latest` would find none here
    say(f"{checkpoint} is the last of a run that had trained to its end (step {result.final_step}): writing "
        f"{' and '.join(WHAT_IS_PENDING[key] for key in pending)}, which the run did not")  # fmt: skip
    with next_step_said(output_dir, checkpoints_dir, result.final_step, checkpoint), stop, outputs_written(output_dir, checkpoints_dir):
        if OUTPUTS_PENDING in pending:
            result.saved_files = save_outputs(output_dir)
            if ours:
                _mark_written(checkpoint, OUTPUTS_PENDING)
        if VALIDATION_PENDING in pending and stop.agreed_now():
            _say_skipped(result, stop.signal, output_dir, again_from)
        elif VALIDATION_PENDING in pending:
            with stop.said_at_once(_finishing_the_samples(result.final_step, output_dir, again_from)), final_grid_said(output_dir, again_from):
                validate(result.final_step)  # its path is the result's, as `finish_training`'s
            if ours:
                _mark_written(checkpoint, VALIDATION_PENDING)
    finish_a_finished_runs_saves(checkpoint, output_dir)  # a rotation the kill cut short, as a resume with nothing left does


@contextlib.contextmanager
def _written_outputs_said(saved_files: list[Path]):
    """The last checkpoint that fails (a disk that filled) once the outputs are written: its line says they are there, whole.
    Its "--resume latest" alone read as if the run's result were lost; that resume trains the last steps again, for the
    checkpoint (and the final samples) alone."""
    try:
        yield
    except FinetuneError as err:
        if not saved_files:
            raise
        raise FinetuneError(f"{err}. The run's outputs are written, whole: {', '.join(str(path) for path in saved_files)}") from None


@contextlib.contextmanager
def final_grid_said(output_dir: Path, resume_from: Path | None = None):
    """The final grid that could not be written (a full disk) is the run's error, unlike a grid mid-run (`TrainingRun.validate`):
    nothing is left to train that going on would save, and the last checkpoint still says the final samples are to come
    (`VALIDATION_PENDING`), so its resume draws them. `resume_from`: as `resume_command`'s."""
    from finetune.training.validation import GridNotWritten  # (torch: loaded by now; `finetune train`'s early checks read this module)

    try:
        yield
    except GridNotWritten as failure:
        raise FinetuneError(f"{failure.what}: the outputs and the last checkpoint are written; make room, then --resume "
                            f"{_resume_option(resume_from)} draws the final samples, without training ({resume_command(output_dir, resume_from)})") from None


def _finishing_the_samples(step: int, output_dir: Path, resume_from: Path | None = None) -> Callable[[int], str]:
    """What a first stop while the final samples are drawn says at once (it is held until they are: they take minutes, and
    the stop had no word until the run ended). `resume_from`: as `resume_command`'s."""
    grid = output_dir / "samples" / f"step-{step:06d}.png"
    return lambda signum: (f"{signal_name(signum)}: finishing the final samples ({grid}); the outputs and the last checkpoint are written. "
                           f"A second {signal_name(signum)} stops now{_launcher_stop_note()}, and --resume {_resume_option(resume_from)} then "
                           f"draws them, without training ({resume_command(output_dir, resume_from)})")  # fmt: skip


def _launcher_stop_note() -> str:
    """Under torchrun (`accelerate launch` of several processes, or of DeepSpeed) the processes are in sessions of their own:
    a stop reaches them through the launcher's agent, which kills them once its shutdown timeout has passed (torch's
    elastic agent: TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by default), finished or not: "finishing" alone promised more."""
    if "LOCAL_RANK" not in os.environ:  # torchrun's (as stopping.lone_launcher tells it)
        return ""
    seconds = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30")
    return (f", as does the launcher {seconds} s after a stop sent to it (torchrun's shutdown timeout: export "
            f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600 before accelerate launch for longer samples)")


def _say_skipped(result, signum: int, output_dir: Path, resume_from: Path | None = None) -> None:
    """A stop after the last step skipped the final samples (the outputs are written): said, with the command that draws
    them, and the run exits as the stop's signal says (it had exited 0, the samples missing without a word)."""
    result.stopped_by = signum
    say(f"stopped ({signal_name(signum)}) after the last step, the outputs written: the final samples "
        f"({output_dir / 'samples' / f'step-{result.final_step:06d}.png'}) are skipped; draw them with --resume "
        f"{_resume_option(resume_from)} ({resume_command(output_dir, resume_from)})")  # fmt: skip


def resume_command(output_dir: Path, resume_from: Path | None = None) -> str:
    """The command that continues the run, to copy: its recipe's path quoted for the shell (an output_dir with a space).
    `resume_from`: the checkpoint it continues from where it is not this run's own (copied from another folder, its
    output_dir holding no checkpoint), else None: the run's latest."""
    return f"finetune train {shlex.quote(str(output_dir / RUN_RECIPE))} --resume {_resume_option(resume_from)}"


def _resume_option(resume_from: Path | None) -> str:
    return "latest" if resume_from is None else shlex.quote(str(resume_from))


def remove_killed_grids(output_dir: Path) -> None:
    """By the main process, as a run (or its resume) starts: the hidden `.step-N.png.partial` a kill while a grid was saved left
    in samples/ (SIGKILL allows no cleanup; a grid drawn again is written over it, a final grid never drawn again stayed for
    good). Only the names runs write there: a file of the user's stays."""
    remove_leftover_partials(output_dir / "samples", lambda name: RUN_ENTRIES["samples"].match(name) is not None)


def _mark_written(checkpoint: Path, key: str) -> None:
    """By the main process: the run's last checkpoint no longer says `key`'s part of the end is to come (its resume would
    write it again)."""
    if main_process():
        atomic_write_text(checkpoint / STATE_FILE, json.dumps({**read_state(checkpoint), key: False}, indent=2))
