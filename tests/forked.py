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
from typing import Callable, NoReturn


def run_forked(call: Callable[[], int | None], timeout: float = 300) -> SimpleNamespace:
    """`call()` in a forked child whose stdout and stderr (the file descriptors and sys.stdout/sys.stderr) are one file, not a
    terminal: its `returncode` (what `call` returned, 0 for None; 1 for an exception, whose traceback is printed; -N for a
    signal N that ended it) and `output` (what it printed); one still running after `timeout` s is killed and fails the test.
    The child never returns into the test: it ends with os._exit."""
    handle, name = tempfile.mkstemp(prefix="forked-", suffix=".log")
    os.close(handle)
    said = Path(name)
    pid = os.fork()
    if pid == 0:

        def to_the_log() -> None:
            log = os.open(said, os.O_WRONLY | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)

        _child_exits_with(to_the_log, call, "run_forked")
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


class StartedFork:
    """A child `start_forked` left running, read as a subprocess.Popen is: `pid`, `poll()`, `wait(timeout)`, `returncode`
    (-N for a signal N that ended it); `stdout` and `stderr`: the files its output goes to."""

    def __init__(self, pid: int, stdout: Path, stderr: Path):
        self.pid, self.returncode, self.stdout, self.stderr = pid, None, stdout, stderr

    def _ended(self, status: int) -> int:
        self.returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return self.returncode

    def poll(self) -> int | None:
        if self.returncode is None and (ended := os.waitpid(self.pid, os.WNOHANG))[0] != 0:
            self._ended(ended[1])
        return self.returncode

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                return self._ended(os.waitpid(self.pid, 0)[1])
            time.sleep(0.05)
        return self.returncode


def start_forked(call: Callable[[], int | None], stdout: Path, stderr: Path, environ: dict[str, str]) -> StartedFork:
    """`call()` in a forked child, as run_forked runs it, left running: a session of its own (its group for os.killpg, as
    Popen's start_new_session), `environ` added to its environment, its stdout and stderr written to those files."""
    for path in (stdout, stderr):
        path.write_bytes(b"")  # there to read from the start, as a Popen's files are
    pid = os.fork()
    if pid == 0:

        def on_its_own() -> None:
            os.setsid()
            os.environ.update(environ)
            for fd, path in ((1, stdout), (2, stderr)):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.stdout, sys.stderr = open(1, "w", buffering=1, closefd=False), open(2, "w", buffering=1, closefd=False)

        _child_exits_with(on_its_own, call, "start_forked")
    return StartedFork(pid, stdout, stderr)


def _child_exits_with(setup: Callable[[], None], call: Callable[[], int | None], caller: str) -> NoReturn:
    """In the forked child: `setup()` (its output files), then `call()`, ending with os._exit of what it returned (1 for an
    exception, whose traceback is printed): the child never returns into the test, which it would go on running."""
    import torch

    code = 1
    try:
        setup()
        torch.set_num_threads(1)  # as a data-loader worker does after a fork: the parent's thread pool is not the child's
        returned = call()
        code = returned or 0
        if not isinstance(code, int):  # os._exit would raise in `finally`, and the child would go on running pytest
            print(f"{caller}: the call returned {returned!r}, not an exit code")
            code = 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
