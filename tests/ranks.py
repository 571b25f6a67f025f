"""`run_ranks`: a call run by each process of a launch forked from the test's and joined over gloo, as `accelerate launch` joins
them on a CPU: a collective tested without the seconds a launch's interpreters take to import torch and diffusers."""

from __future__ import annotations

import os
import signal
import time
import traceback
from pathlib import Path

import torch

from ports import free_port


def run_ranks(call, folder: Path, processes: int = 2, timeout: float = 60) -> list[str]:
    """`call(accelerator)` in `processes` processes forked from this one, joined over gloo as `accelerate launch` joins
    them: by rank, "done" or the line of what it raised (its type's name first). One still running after `timeout` s (a
    process left waiting in a collective: gloo's own timeout is 30 minutes) is killed and fails the test."""
    port, children = str(free_port()), []
    for rank in range(processes):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(processes), LOCAL_WORLD_SIZE=str(processes),
                                  RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0")  # fmt: skip
                torch.set_num_threads(1)
                from accelerate import Accelerator
                from accelerate.state import PartialState

                from finetune.training.accelerate_state import clear_accelerate_settings

                clear_accelerate_settings()
                PartialState._reset_state()  # the test process's own (one process) is not this launch's
                try:
                    call(Accelerator(cpu=True))
                    said = "done"
                except Exception as err:  # what the run would end with on this process
                    said = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                (folder / f"rank{rank}.txt").write_text(said)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        children.append(pid)
    deadline, waiting = time.monotonic() + timeout, set(children)
    while waiting and time.monotonic() < deadline:
        waiting -= {pid for pid in waiting if os.waitpid(pid, os.WNOHANG)[0] != 0}
        time.sleep(0.05)
    for pid in waiting:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    said = [(folder / f"rank{rank}.txt").read_text() if (folder / f"rank{rank}.txt").exists() else "killed: still running" for rank in range(processes)]
    assert not waiting, f"processes still running after {timeout} s: {said}"
    return said
