"""`accelerate launch` of one process (`--cpu`, or one GPU) waits for it and nothing more: a SIGTERM sent to the launcher
(`timeout`, a job scheduler, a `kill` of the process it shows) ended the launcher and left the training process running
on, unseen. Training now stops as on SIGTERM once its launcher has ended; a shell's end (`nohup`) stops nothing."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from finetune.distributed.stopping import lone_launcher

ROOT = Path(__file__).resolve().parents[1]

# The training loop's stop, at each step boundary (0.05 s apart), in a process started by the launcher below.
TRAINING = """
import os, sys, time
from pathlib import Path
from types import SimpleNamespace
from finetune.distributed.stopping import StopRequest

out = Path(sys.argv[1])
with StopRequest(SimpleNamespace(num_processes=1)) as stop:
    (out / "ready").write_text(str(os.getpid()))
    deadline = time.monotonic() + 30
    while not stop.agreed() and time.monotonic() < deadline:
        time.sleep(0.05)
(out / "stopped").write_text(str(stop.signal))
"""

# accelerate's launcher for one process, as its command line reads (python .../bin/accelerate launch ...): Popen, wait.
LAUNCHER = f"""
import subprocess, sys
subprocess.Popen([sys.executable, "-c", {TRAINING!r}, sys.argv[2]]).wait()
"""


def wait_for(path: Path, seconds: float) -> str | None:
    """The text written to `path`, once there is some: write_text creates the file before it writes, so a read between
    the two found '' (the pid, then the signal, of a run that had stopped as it should)."""
    deadline = time.monotonic() + seconds
    while not (path.is_file() and (text := path.read_text())):
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)
    return text


def test_training_stops_as_on_sigterm_once_its_launcher_is_ended_by_it(tmp_path):
    (tmp_path / "accelerate").write_text(LAUNCHER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    launcher = subprocess.Popen([sys.executable, str(tmp_path / "accelerate"), "launch", str(tmp_path)], env=env)
    training = None
    try:
        training = wait_for(tmp_path / "ready", 120)
        assert training is not None, "the training process did not start"
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=30) == -signal.SIGTERM
        assert wait_for(tmp_path / "stopped", 40) == str(int(signal.SIGTERM)), "the training process ran on"
    finally:
        launcher.kill()
        if training is not None:  # not left running where the test failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(training), signal.SIGKILL)


def test_a_process_started_by_anything_else_has_no_launcher_to_watch():
    """pytest here, as a shell or `nohup` elsewhere: its end must not stop a run."""
    assert lone_launcher() is None
