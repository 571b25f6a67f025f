"""`finetune demo` stopped by Ctrl-C says so in its own line: gradio's wait printed "Keyboard interruption in main
thread... closing server." (and the same of an OSError, which it hid)."""

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import gradio
import pytest
from ports import free_port

from finetune.demo.page import launch_app


class Served:
    """An app as launch() leaves it serving, with gradio's own wait; Ctrl-C comes while it waits, once running was
    looked at `checks` times (or `stop` is raised there)."""

    block_thread = gradio.Blocks.block_thread
    server = None

    def __init__(self, stop=KeyboardInterrupt):
        self.stop, self.closed, self.checks = stop, False, 0

    def launch(self, **options):
        return None, "http://127.0.0.1:7860/", None

    @property
    def is_running(self):
        self.checks += 1
        if self.checks == 2:
            raise self.stop
        return not self.closed

    def close(self, verbose=True):
        self.closed = True


def test_ctrl_c_stops_the_demo_with_its_own_line_and_closes_the_server(monkeypatch, capsys):
    app = Served()
    assert launch_app(app, block=True) == "http://127.0.0.1:7860/"
    assert capsys.readouterr().out == "demo running on http://127.0.0.1:7860/ (Ctrl-C stops it)\ndemo stopped\n"
    assert app.closed
    failing = Served(stop=OSError("the disk went away"))
    with pytest.raises(OSError, match="the disk went away"):  # said, not taken for a Ctrl-C
        launch_app(failing, block=True)
    assert failing.closed and "Keyboard interruption" not in capsys.readouterr().out


def test_ctrl_c_right_after_the_running_line_is_the_demos_stop_too(monkeypatch):
    """The line was said before the wait's try: a Ctrl-C at once after it (as a test or a quick hand sends it) went
    past the demo's stop to the command's "stopped (Ctrl-C): files written so far are kept", exit status 130."""
    import io
    import sys

    class InterruptedAfterTheRunningLine(io.StringIO):
        def flush(self):  # the line said whole (print flushes it), then Ctrl-C
            if self.getvalue().endswith("(Ctrl-C stops it)\n"):
                raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdout", InterruptedAfterTheRunningLine())
    app = Served()
    try:
        launch_app(app, block=True)
    except KeyboardInterrupt:  # left unseen, it would stop pytest itself
        pytest.fail("the Ctrl-C went past the demo's stop")
    assert sys.stdout.getvalue() == "demo running on http://127.0.0.1:7860/ (Ctrl-C stops it)\ndemo stopped\n" and app.closed


def cpu_seconds(pid: int) -> float:
    """A running process's CPU time so far (user and system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow  # starts the real `finetune demo` (a base load and gradio's start: ~15 s, more on a busy host)
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads a process's CPU time from /proc")
def test_the_demo_exits_promptly_after_ctrl_c(tiny_model, tmp_path):
    """It took 6 to 16 s to exit after "demo stopped" on a busy host: the interpreter's last garbage collections over
    every object gradio, torch and the model made. Counted in CPU seconds, which a busy host stretches far less than
    the time it takes (1.7 s of CPU before, 0.2 s after, with the tiny model on 2 shared cores)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "finetune", "demo", "--base", str(tiny_model), "--adapters", str(tmp_path), "--port", str(free_port())]
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    demo = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        said = []
        for line in demo.stdout:  # the URL is said once it serves
            said.append(line)
            if "Ctrl-C stops it" in line or "error" in line:
                break
        assert "demo running on" in said[-1], said
        before_stop = cpu_seconds(demo.pid)
        demo.send_signal(signal.SIGINT)
        rest = demo.communicate(timeout=120)[0]
    finally:
        demo.kill()
        demo.wait()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    whole = children.ru_utime + children.ru_stime - children_before.ru_utime - children_before.ru_stime
    assert demo.returncode == 0 and "demo stopped" in rest, rest
    assert whole - before_stop < 0.8, f"{whole - before_stop:.2f} CPU seconds from Ctrl-C to the exit"
