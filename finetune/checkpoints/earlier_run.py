"""The earlier run in a run's output_dir: kept unless the user asks for it to go (--overwrite), never mixed with
a new run's checkpoints, and never the resume of another run's checkpoint."""

from __future__ import annotations

import errno
import functools
import os
import re
import shutil
import sys
from pathlib import Path

from finetune.console import say
from finetune.errors import FinetuneError, nearest_existing, refuse_a_file_in_the_way
from finetune.checkpoints.run_files import (CHECKPOINT_PATTERN, CONTROLNET_DIR, LORA_WEIGHTS_NAME, PARTIAL, PIPELINE_DIR, REMOVED, STATE_FILE, UNET_DIR, checkpoint_step,
                                interrupted_checkpoints, list_checkpoints, read_state, resumable_checkpoints)  # fmt: skip

# What a run leaves in its output_dir besides its outputs: `overwrite` clears these (DreamBooth's generated
# class images stay: they are named by their prompt and settings, so a new run reuses only matching ones).
RUN_FOLDERS = ("checkpoints", "samples", "logs")
# What runs write in each, by name (and the hidden partials of a write a kill left, and a checkpoint folder a kill left set
# aside as `.checkpoint-N.old` while it was being replaced: atomic_files.replace_folder): all that `overwrite` removes there. A
# file of the user's stays: a log of this very run (`finetune train ... --overwrite > run/logs/train.log`), an image kept in
# samples/, notes in checkpoints/; the folder goes only where nothing else is left in it.
RUN_ENTRIES = {
    "checkpoints": re.compile(rf"^(?:(?:{re.escape(PARTIAL)}|{re.escape(REMOVED)})?checkpoint-\d+|\.checkpoint-\d+\.old)$"),
    "samples": re.compile(r"^(?:(?:step-\d+|loss-masks)\.png|\.(?:step-\d+|loss-masks)\.png\.partial)$"),  # validation's grids, the loss masks' strip
    "logs": re.compile(r"^finetune$"),  # TensorBoard's, as accelerate names a tracker's folder by the project (init_trackers)
}
# What a finished run writes there (each method's `save`; method vae's pipeline is named as full's). A user who deletes a
# finished run's checkpoints to make room still holds these, and a new run in that output_dir replaced them unasked.
RUN_OUTPUTS = (LORA_WEIGHTS_NAME, CONTROLNET_DIR, UNET_DIR, PIPELINE_DIR)


def guard_earlier_run(output_dir: Path, resume_from: Path | None, overwrite: bool) -> None:
    """A fresh run must not mix with an earlier run's checkpoints: its rotation would delete theirs (or
    replace a checkpoint of the same step), and `--resume latest` would later pick theirs. Cheap: it
    runs before anything is loaded, as does the check that output_dir can be written at all."""
    refuse_a_file_in_the_way(output_dir, "the run's checkpoints and outputs", f"output_dir {output_dir}")
    existing = nearest_existing(output_dir)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FinetuneError(f"output_dir {output_dir}: {existing} cannot be written to (permissions, or a read-only disk): choose another output_dir")
    check_run_folder_links(output_dir)
    check_run_folder_writable(output_dir, "checkpoints", "saves its checkpoints")  # every run does (its last step at least)
    earlier = resumable_checkpoints(output_dir / "checkpoints")  # with those a kill left under other names, which a resume puts back
    named = {final: source.name for final, source in interrupted_checkpoints(output_dir / "checkpoints").items()}  # (what is there)
    # A resume saves only steps past its checkpoint's: a folder of an earlier step is in no save's way (one an older finetune's
    # rotation left half-deleted, without its state, stopped every resume of that run).
    check_no_other_checkpoint_names(output_dir / "checkpoints", earlier, after_step=checkpoint_step(resume_from) if resume_from is not None else -1)
    if resume_from is not None and earlier and not _of_this_run(resume_from, output_dir):  # rotation would delete them unasked
        raise FinetuneError(f"--resume {resume_from}: output_dir {output_dir} holds checkpoints of another run ({named.get(earlier[-1], earlier[-1].name)}), which this run's "
                            f"would replace and rotate away: set output_dir to a new folder, or move them out of {output_dir / 'checkpoints'} to keep them")  # fmt: skip
    if resume_from is not None:
        # Resumed from an older step, the run would retrain the steps of the later ones: they are another
        # history, which rotation would keep over the new one's and `--resume latest` would pick.
        step = checkpoint_step(resume_from)
        # By the folders' names: an earlier checkpoint's damaged state must not stop a resume from another.
        later = [named.get(p, p.name) for p in earlier if int(CHECKPOINT_PATTERN.match(p.name).group(1)) > step]
        if later:
            raise FinetuneError(
                f"--resume {resume_from.name}: {output_dir / 'checkpoints'} also holds later checkpoints of the steps it would train again "
                f"({', '.join(later)}): move them out of that folder to keep them (or delete them), then resume"
            )
        return
    if overwrite:
        check_clearable(output_dir)
        return
    if earlier:
        raise FinetuneError(
            f"output_dir {output_dir} holds an earlier run ({named.get(earlier[-1], earlier[-1].name)}): continue it with --resume latest, "
            f"replace it with --overwrite (deletes its checkpoints, samples, logs and outputs), or set output_dir to a new folder"
        )
    if outputs := [name for name in RUN_OUTPUTS if (output_dir / name).exists()]:
        raise FinetuneError(f"output_dir {output_dir} holds the outputs of an earlier run ({outputs[0]}) and no checkpoint to continue: "
                            f"set output_dir to a new folder to keep them, or replace them with --overwrite")  # fmt: skip


def put_back_interrupted_checkpoints(accelerator, checkpoints_dir: Path) -> None:
    """Collective, once every process has read all it reads of the checkpoint it resumes, where it lies
    (`run_files.interrupted_checkpoints`: nothing moved before, so every process chose the same; put back as the main process
    started, a process that listed them before it chose an older one). The main process renames each such folder checkpoint-N
    (the run's first save would delete a `.partial-` one), with a line for each, and removes a `.checkpoint-N.old` a kill after
    both renames left beside its checkpoint-N; the others wait for it, and stop with its failure. In `finetune train`, in the
    output_dir's lock (a run still saving there is between those renames too)."""
    from accelerate.utils import broadcast_object_list

    accelerator.wait_for_everyone()  # (accelerate's load_state ends in no barrier: a process may still be reading)
    failure = _put_back(checkpoints_dir) if accelerator.is_main_process else None
    if failure := broadcast_object_list([failure])[0]:
        raise FinetuneError(failure)


def finish_a_finished_runs_saves(checkpoint: Path, output_dir: Path) -> Path:
    """`checkpoint`, the last of the run in `output_dir` that finished (at train.max_steps), by its own name (checkpoint-N). No
    run will resume it, so the main process finishes here what a kill or a second Ctrl-C cut short of the run's last save,
    which no later save would: the checkpoint left before its rename (`run_files.interrupted_checkpoints`) is put back, one
    its rotation left half-deleted (`.removed-checkpoint-M`) is removed, and the rotation itself is done, as the run's recipe
    said it (its checkpoint.keep_last, kept in the checkpoint: not this command's, which may keep fewer). Each stayed for
    good, a whole checkpoint's size. A checkpoint outside the run's checkpoints/ (copied elsewhere) is only read: that folder
    is none of the run's. Collective in a run of several processes (each calls it, joined): the main process moves folders
    only once every process is done reading the checkpoint where it lies (its data order, its held-out images)."""
    from finetune.distributed.process_env import main_process

    checkpoints_dir = checkpoint.parent
    # Listed before the wait below: after it, the main process may have put it back, and another named the `.partial-` folder.
    final = {source: final for final, source in interrupted_checkpoints(checkpoints_dir).items()}.get(checkpoint, checkpoint)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _joined_wait_for_everyone():
        return final  # processes not joined yet: none can wait for the others' reads (`checkpoint.check_resumable`'s caller)
    if main_process() and checkpoints_dir.resolve() == (output_dir / "checkpoints").resolve():
        if failure := _put_back(checkpoints_dir):
            raise FinetuneError(failure)
        for removed in checkpoints_dir.glob(f"{REMOVED}checkpoint-*"):
            shutil.rmtree(removed, ignore_errors=True)
        saved = list_checkpoints(checkpoints_dir)
        if saved and saved[-1] == final:  # the run's last (not an older one given with a lower max_steps)
            keep_last = (read_state(saved[-1]).get("recipe") or {}).get("checkpoint.keep_last") or 0
            for old in saved[:-keep_last] if keep_last > 0 else []:
                remove_checkpoint(old)
                say(f"removed {old}: the run's last save, cut short by a kill, had not yet rotated it out (checkpoint.keep_last {keep_last})")
    return final


def _joined_wait_for_everyone() -> bool:
    """Whether this process is joined to the run's others; if so, once they all are here. Without the wait, another
    process still reading the checkpoint where a kill left it (`.partial-checkpoint-N`) failed on the folder gone."""
    distributed = sys.modules.get("torch.distributed")  # (no torch is imported for it: `finetune train` checks before torch loads)
    if distributed is None or not (distributed.is_available() and distributed.is_initialized()):
        return False
    distributed.barrier()
    return True


def remove_checkpoint(checkpoint: Path) -> None:
    """Delete a rotated-out checkpoint: renamed out of the checkpoint-N pattern first, so that a kill midway
    (SIGKILL, a power cut) leaves a `.removed-` folder the next save deletes, not a checkpoint-N without its
    trainer_state.json, which no listing, rotation or save would ever remove (a full UNet's weights and
    optimizer state, gigabytes, for good)."""
    aside = checkpoint.with_name(f"{REMOVED}{checkpoint.name}")
    try:
        shutil.rmtree(aside, ignore_errors=True)  # (one a killed run left, of the same step)
        checkpoint.rename(aside)
    except OSError:  # a name that cannot change (a busy file on a network disk): deleted where it is
        aside = checkpoint
    shutil.rmtree(aside, ignore_errors=True)


def _put_back(checkpoints_dir: Path) -> str | None:
    """The main process's part; the line that says why a folder could not be put back, or None."""
    for final, source in interrupted_checkpoints(checkpoints_dir).items():
        aside = final.with_name(f".{final.name}.old")
        try:
            source.rename(final)
        except OSError as err:
            return (f"could not put back {final} from the folders a killed save left ({err.strerror or err}): fix the permissions "
                    f"of {checkpoints_dir}, or rename {source.name} there to {final.name} yourself")  # fmt: skip
        if source == aside:
            replacement = final.with_name(f"{PARTIAL}{final.name}")
            unfinished = " (its replacement, unfinished, is removed)" if replacement.exists() else ""
            shutil.rmtree(replacement, ignore_errors=True)  # (else `_remove_unfinished_saves` said it again, as a save of its own)
            say(f"put back {final}: a kill while it was replaced left it as {aside.name}{unfinished}")
        elif aside.is_dir():
            shutil.rmtree(aside, ignore_errors=True)  # the older state of the same step
            say(f"put back {final}: a kill while it was saved left it as {source.name} (the folder it replaced, {aside.name}, is removed)")
        else:
            say(f"put back {final}: a kill after it was saved, before it was renamed into place, left it as {source.name}")
    for aside in checkpoints_dir.glob(".checkpoint-*.old") if checkpoints_dir.is_dir() else []:
        # The kill came after both renames: the aside, a whole checkpoint's size, would stay for good.
        final = checkpoints_dir / aside.name[1 : -len(".old")]
        if CHECKPOINT_PATTERN.match(final.name) and aside.is_dir() and (final / STATE_FILE).is_file():
            shutil.rmtree(aside, ignore_errors=True)
    _remove_unfinished_saves(checkpoints_dir)
    return None


def _remove_unfinished_saves(checkpoints_dir: Path) -> None:
    """The `.partial-checkpoint-N` folders still there once the whole ones are put back: saves a kill or a crash cut short
    (no trainer_state.json, written last), which no resume can take. Removed with a line: the resume had said only the older
    checkpoint it took, so a run killed while it saved seemed to have lost its newer one without a word (the next save
    removed them, unsaid)."""
    for partial in sorted(checkpoints_dir.glob(f"{PARTIAL}checkpoint-*")) if checkpoints_dir.is_dir() else []:
        shutil.rmtree(partial, ignore_errors=True)
        name = partial.name.removeprefix(PARTIAL)
        say(f"{'could not remove' if partial.exists() else 'removed'} {partial}: the save of {name}, cut short by a kill or a crash "
            f"(no {STATE_FILE}: unfinished), which no resume can take")


def check_run_folder_links(output_dir: Path) -> None:
    """A run folder that is a link to nothing (checkpoints put on a disk not mounted now) is said before anything loads:
    the first checkpoint save failed on it (FileExistsError) once the run had trained, and --overwrite leaves the link."""
    for name in RUN_FOLDERS:
        folder = output_dir / name
        if folder.is_symlink() and not folder.exists():
            raise FinetuneError(f"output_dir {output_dir}: {folder} is a link to {os.readlink(folder)}, which does not exist "
                                f"(a disk not mounted?): mount or make that folder, or remove the link")  # fmt: skip


def check_run_folder_writable(output_dir: Path, name: str, writes: str) -> None:
    """output_dir's run folder `name` (RUN_FOLDERS), where the run `writes` ("saves its checkpoints"), can be made and written,
    said before anything loads: one refused there had failed once the model was loaded, a checkpoint at the first save (the run
    trained to it), TensorBoard's writer at the start (a traceback), a grid mid-run (a warning). An output_dir that cannot be
    written, where it would be made, is guard_earlier_run's line."""
    folder = output_dir / name
    if folder.exists() and not folder.is_dir():
        raise FinetuneError(f"output_dir {output_dir}: {folder} is a file, and the run {writes} in a folder of that name: move the file "
                            f"out of {output_dir}, or choose another output_dir")  # fmt: skip
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        raise FinetuneError(f"output_dir {output_dir}: {folder} cannot be written to (permissions, or a read-only disk), and the run {writes} "
                            f"there: fix its permissions (or mount it writable), or choose another output_dir")  # fmt: skip


def check_no_other_checkpoint_names(checkpoints_dir: Path, complete: list[Path], after_step: int = -1) -> None:
    """An entry named as a checkpoint that is none a run completed (no trainer_state.json: a folder of the user's, weights
    copied in by hand) of a step past `after_step`: the run's save of that step replaced it (rotation then deleted that),
    and --overwrite removed it."""
    try:
        names = sorted(name for name in os.listdir(checkpoints_dir) if (found := CHECKPOINT_PATTERN.match(name)) and int(found.group(1)) > after_step)
    except OSError:  # none yet (or unreadable: listing it for the earlier run's found none either)
        return
    if others := [name for name in names if name not in {path.name for path in complete}]:
        raise FinetuneError(f"{checkpoints_dir / others[0]} is not a checkpoint a run completed (no {STATE_FILE}), and this run's checkpoint "
                            f"of that step would replace it: move it out of {checkpoints_dir} (or delete it), then run again")  # fmt: skip


def _of_this_run(checkpoint: Path, output_dir: Path) -> bool:
    """Whether `checkpoint` is one of `output_dir`'s run: in its checkpoints/, or copied out of it (its recipe's output_dir)."""
    if checkpoint.resolve().parent == (output_dir / "checkpoints").resolve():
        return True
    began = (read_state(checkpoint).get("recipe") or {}).get("output_dir")
    return began is not None and Path(began).expanduser().resolve() == output_dir.resolve()


def check_clearable(output_dir: Path) -> None:
    """--overwrite, before anything loads: every entry of the earlier run's can be removed (a folder the user cannot
    write, or one on a read-only disk, would stop the clear halfway, once the model had loaded). Only those: a folder of
    the user's in logs/ that they cannot write is none of the run's and stays."""
    for name, pattern in RUN_ENTRIES.items():
        entries = _run_entries(output_dir / name, pattern)
        for folder in ([output_dir / name] if entries else []) + [sub for entry in entries for sub, _, _ in os.walk(entry)]:
            if not os.access(folder, os.W_OK | os.X_OK):
                raise FinetuneError(f"--overwrite: {folder} cannot be written to (permissions, or a read-only disk), so the earlier run's files in it "
                                    f"cannot be removed: fix its permissions or remove them from {output_dir / name} yourself, or set output_dir to a new folder")  # fmt: skip


def _run_entries(folder: Path, pattern: re.Pattern) -> list[Path]:
    """The entries of `folder` a run writes, by name (none where there is no folder, or it cannot be read)."""
    try:
        return sorted(folder / name for name in os.listdir(folder) if pattern.match(name))
    except OSError:
        return []


def clear_earlier_run(accelerator, output_dir: Path, read: tuple[str | None, ...] = ()) -> None:
    """--overwrite, once every check has passed: the earlier run's checkpoints, samples, logs and outputs go (removed by the
    main process), but for an output the new run reads (`read`: the paths it starts from, lora.init_from naming the earlier
    run). One that cannot be removed (a busy file on a network disk, a read-only one) stops the run on every process:
    left there silently, its checkpoints mixed with the new run's, and a later `--resume latest` picked a stale one."""
    from accelerate.utils import broadcast_object_list

    failure = _removal_failure(output_dir, read) if accelerator.is_main_process else None
    failure = broadcast_object_list([failure])[0]  # the other processes wait for the main one's clear, and stop with it
    if failure:
        raise FinetuneError(failure)


def _removal_failure(output_dir: Path, read: tuple[str | None, ...] = ()) -> str | None:
    """Removes what it can of the earlier run; the line to say for the first entry (by name) that stayed, or None."""
    failures: list[tuple[str, OSError]] = []

    def note(_function, path, error):  # Python 3.12 passes the exception (onexc), 3.11 sys.exc_info() (onerror)
        error = error[1] if isinstance(error, tuple) else error
        if not isinstance(error, FileNotFoundError):  # gone already (a folder this run had none of): nothing stays
            failures.append((path, error))

    mixed, taken = "its checkpoints would mix with this run's", "it would be taken for this run's output"
    removals = [(functools.partial(_remove_run_entries, output_dir / name, pattern, note), mixed) for name, pattern in RUN_ENTRIES.items()]
    # Its outputs too: left until the new run's end, a new run stopped or failed before then left them beside its own
    # checkpoints, where `finetune sample --lora` and the demo took the earlier run's LoRA for this run's.
    removals += [(functools.partial(_remove_output, output_dir / name, note), taken) for name in RUN_OUTPUTS if not _read_by_the_run(output_dir, output_dir / name, read)]
    for remove, left_there in removals:
        remove()
        if failures:
            # The file that stayed, not the folders it kept from going (not empty); by name: the same line each time.
            causes = [(path, error) for path, error in failures if getattr(error, "errno", None) != errno.ENOTEMPTY] or failures
            path, error = min(causes, key=lambda failure: str(failure[0]))
            return (f"--overwrite: could not remove {path} of the earlier run ({getattr(error, 'strerror', None) or error}): remove "
                    f"it yourself (or free the file: another program may hold it open), then run again; left there, {left_there}")  # fmt: skip
    return None


def _read_by_the_run(output_dir: Path, output: Path, read: tuple[str | None, ...]) -> bool:
    """Whether the new run reads `output` of the earlier run: a path it starts from is that output, inside it, or the
    run's folder that holds it (lora.init_from=outputs/lora reads its LoRA file)."""
    output = output.resolve()
    for path in (Path(p).expanduser().resolve() for p in read if p):
        if path in (output, output_dir.resolve()) or output in path.parents:
            return True
    return False


def _remove_output(output: Path, note) -> None:
    """Removes one of the earlier run's outputs (RUN_OUTPUTS): its LoRA file, or its pipeline, UNet or ControlNet folder (a
    link to one: the link)."""
    if output.is_dir() and not output.is_symlink():
        shutil.rmtree(output, **{"onexc" if sys.version_info >= (3, 12) else "onerror": note})
    elif output.is_symlink() or output.exists():
        try:
            os.unlink(output)
        except OSError as error:
            note(os.unlink, str(output), error)


def _remove_run_entries(folder: Path, pattern: re.Pattern, note) -> None:
    """Removes what a run wrote in `folder` (`RUN_ENTRIES`), then the folder itself where nothing else is left in it. A
    folder that is a link (checkpoints put on another disk) stays, so the new run's files go where the user sent the
    earlier run's (rmtree refuses a link); an entry is removed by the link's path, so a line names the file as the user put it."""
    on_error = {"onexc" if sys.version_info >= (3, 12) else "onerror": note}
    if not folder.is_dir():  # none, or a link to nothing (or to a file): it holds nothing of the earlier run
        return
    try:
        entries = [entry for entry in os.scandir(folder) if pattern.match(entry.name)]
    except OSError as error:
        note(os.scandir, str(folder), error)
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, **on_error)
        else:
            try:
                os.unlink(entry.path)
            except OSError as error:
                note(os.unlink, entry.path, error)
    if not folder.is_symlink():
        try:
            folder.rmdir()
        except OSError:  # a file of the user's is left in it (or the folder cannot go: the new run writes in it as it is)
            pass
