"""`run_forked`: a call run in a process of its own forked from the test's, with the libraries this one imported. A fresh
interpreter (`python -c`, `python -m finetune`) spent about 10 CPU seconds importing torch and diffusers before doing anything;
where a test needs a process of its own (a kill, output to a file as from a shell) and not that start, the fork is that process."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Callable


def run_forked(call: Callable[[], int | None], timeout: float = 300) -> SimpleNamespace:
    """`call()` in a forked child whose stdout and stderr (the file descriptors and sys.stdout/sys.stderr) are one file, not a
    terminal: its `returncode` (what `call` returned, 0 for None; 1 for an exception, whose traceback is printed; -N for a
    signal N that ended it) and `output` (what it printed); one still running after `timeout` s is killed and fails the test.
    The child never returns into the test: it ends with os._exit."""
    import torch

    handle, name = tempfile.mkstemp(prefix="forked-", suffix=".log")
    os.close(handle)
    said = Path(name)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            log = os.open(said, os.O_WRONLY | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
            torch.set_num_threads(1)  # as a data-loader worker does after a fork: the parent's thread pool is not the child's
            returned = call()
            code = returned or 0
            if not isinstance(code, int):  # os._exit would raise in `finally`, and the child would go on running pytest
                print(f"run_forked: the call returned {returned!r}, not an exit code")
                code = 1
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
            finally:
                os._exit(code)
    deadline = time.monotonic() + timeout
    while (ended := os.waitpid(pid, os.WNOHANG))[0] == 0:  # a fork can hang on a lock another thread held: never CI's whole run
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the forked process ran past {timeout} s: {said.read_text()[-2000:]}")
        time.sleep(0.05)
    status = ended[1]
    output = said.read_bytes().decode("utf-8", "replace")  # as written: read_text would turn a bar's "\r" into "\n"
    said.unlink()
    return SimpleNamespace(returncode=-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status), output=output)
