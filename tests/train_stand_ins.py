"""`finetune train` in processes of a launch started by hand, reaching its run in seconds: for the tests of what a run's
processes say when it fails (tests/test_errors_of_one_process.py, test_errors_on_two_machines.py, test_lost_process.py).

Their scripts (run as `python -c` runs one, by `start_processes`) import this module, set stand-ins on the command's early
checks with `stand_in_early_checks`, and run the command with a train() of their own (`run_train`). The stand-ins are
here once: a check whose signature changes is changed here, not in each script."""

import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import finetune.cli.main
import finetune.cli.run_refusals
import finetune.cli.train_command
import finetune.config.recipe_loading
import finetune.data_check.starting_files
import finetune.data_check.train_inputs
import finetune.models.native_resolution
from forked import StartedFork, start_forked
from ports import free_port

TESTS = Path(__file__).resolve().parent


def stand_in_early_checks(output_dir: str) -> None:
    """`finetune train recipe.yaml` in this process reads no recipe (a fake one, writing to `output_dir`), and checks no
    inputs, data, starting files or refusals of the run: what the tests launch fails in the run, after these."""
    recipe = SimpleNamespace(output_dir=output_dir, data=SimpleNamespace(resolution=512), model=SimpleNamespace(pretrained="", single_file_config=None))
    finetune.config.recipe_loading.load_recipe = lambda path, overrides: recipe
    finetune.data_check.train_inputs.check_inputs_exist = lambda recipe: None
    finetune.data_check.train_inputs.check_data_first = lambda recipe, resume_from=None: None  # nor data
    finetune.data_check.starting_files.check_starting_files = lambda recipe, resuming: None  # nor the files it starts from
    finetune.cli.run_refusals.check_run_first = lambda *a: None  # nor train()'s refusals of the run
    finetune.models.native_resolution.far_from_native_line = lambda *a: None  # the fake recipe names no real base
    finetune.cli.train_command.quiet_weight_progress_bars = lambda: None  # (imports diffusers and transformers: 3 CPU s a process)


def run_train(train) -> int:
    """`finetune train recipe.yaml` with `train` as the trainer's train() (diffusers not imported: seconds): its exit code."""
    sys.modules["finetune.training.trainer"] = SimpleNamespace(train=train)
    return finetune.cli.main.main(["train", "recipe.yaml"])


def start_processes(script: str, *args: str, world_size: int, per_machine: int) -> list[StartedFork]:
    """`script` run as `python -c script *args` runs it, as each process of a launch of `world_size` processes, `per_machine`
    to a machine (all on loopback, without torchrun's agent: rank 0's process hosts the store), in rank order. Each is a fork
    of this process (tests/forked.py), not a fresh interpreter: one of those spent seconds of CPU importing torch and
    accelerate, several per test, before the run whose lines these tests read."""
    port = str(free_port())
    folder = Path(tempfile.mkdtemp(prefix="stand-ins-"))

    def as_python_c() -> int:
        sys.argv = ["-c", *args]
        try:
            exec(compile(script, "<string>", "exec"), {"__name__": "__main__"})
        except SystemExit as exit:  # sys.exit(code): the interpreter's exit code, as it would end with it
            if exit.code is None or isinstance(exit.code, int):
                return exit.code or 0
            print(exit.code, file=sys.stderr)
            return 1
        return 0

    return [
        start_forked(as_python_c, folder / f"{rank}.out", folder / f"{rank}.err", {
            "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(per_machine), "RANK": str(rank), "LOCAL_RANK": str(rank % per_machine), "GROUP_RANK": str(rank // per_machine)})
        for rank in range(world_size)
    ]  # fmt: skip


def outputs(processes: list[StartedFork]) -> list[tuple[str, str]]:
    """Each process's (stdout, stderr) once it has ended; every one is killed after, or on a hang (the wait's 600 s bound
    only ends a hang)."""
    try:
        for process in processes:
            process.wait(timeout=600)
        return [(process.stdout.read_text(), process.stderr.read_text()) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=60)
        for folder in {process.stdout.parent for process in processes}:  # one per start_processes call
            shutil.rmtree(folder, ignore_errors=True)
