"""A command's exit: the interpreter's last garbage collections walked every object torch and diffusers made, 2 s of
CPU (4 to 9 s on a busy host) between a command's last line and its exit. The CLI collects once at exit and freezes
what is left; what a run leaves to the exit must still be written. And Ctrl-C's line, wherever it comes."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]

# A command that leaves to the exit what runs do: an atexit handler of a library that writes a file (as a tracker's or
# a process group's teardown does), and a writer in a reference cycle that writes its last lines when it is collected.
# Automatic collection is off so that the cycle is still there at the exit, not collected by chance before it.
SCRIPT = """
import atexit, gc, json, sys
from finetune.cli import main as cli

folder, seen = sys.argv[1], {}
atexit.register(lambda: (seen.update(after_all=gc.get_freeze_count()), open(folder + "/seen.json", "w").write(json.dumps(seen))))

class WritesWhenCollected:
    def __init__(self, path):
        self.path, self.pending, self.itself = path, [], self
    def __del__(self):
        with open(self.path, "w") as file:
            file.write("".join(self.pending))

def command(args):
    gc.disable()
    def library_teardown():
        seen["teardown"] = gc.get_freeze_count()
        with open(folder + "/teardown.txt", "w") as file:
            file.write("t" * 100_000 + "end")
    atexit.register(library_teardown)
    WritesWhenCollected(folder + "/in_a_cycle.txt").pending.append("c" * 100_000 + "end")  # garbage, in a cycle
    print("done")
    return 0

cli.COMMANDS["check-data"] = command
sys.exit(cli.main(["check-data"]))
"""


def test_the_exit_collects_once_then_freezes_after_the_commands_own_exit_handlers(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "done\n" and done.stderr == "", done
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["teardown"] == 0, seen  # the library's handler ran on a heap not yet frozen
    assert seen["after_all"] > 0, seen  # and before the interpreter's last collections, the heap was frozen
    assert (tmp_path / "teardown.txt").read_text() == "t" * 100_000 + "end"
    assert (tmp_path / "in_a_cycle.txt").read_text() == "c" * 100_000 + "end"  # collected at the exit: written, not lost


# A Ctrl-C pressed while the exit collects (it comes from a finalizer the collection runs, so it comes then).
CTRL_C_AT_THE_EXIT = """
import gc, os, signal, sys
from finetune.cli import main as cli

class CtrlCWhenCollected:
    def __init__(self):
        self.itself = self
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        sum(range(100_000))  # Python code after it, where a handler raises

def command(args):
    gc.disable()
    CtrlCWhenCollected()
    print("done")
    return 0

cli.COMMANDS["check-data"] = command
sys.exit(cli.main(["check-data"]))
"""


def test_a_ctrl_c_while_the_exit_collects_ends_the_process_without_a_traceback():
    """The command is done: a KeyboardInterrupt raised in the collection printed "Exception ignored in atexit callback"
    and its traceback."""
    done = subprocess.run([sys.executable, "-c", CTRL_C_AT_THE_EXIT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout == "done\n" and done.stderr == "" and done.returncode == -signal.SIGINT, done


def test_ctrl_c_while_the_arguments_are_read_is_the_stop_line_not_a_traceback(monkeypatch, capsys):
    """Reading the arguments imports every command's options (0.3 s on a busy host), outside the command's stop line:
    a Ctrl-C right after Enter printed a traceback of argparse's and importlib's frames."""

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "parse_arguments", interrupted)
    try:
        assert cli.main(["check-data"]) == 130
    except KeyboardInterrupt:  # left unseen, it would stop pytest itself
        pytest.fail("the Ctrl-C went past the command's stop line")
    assert capsys.readouterr().err.strip() == "stopped (Ctrl-C): files written so far are kept; run the command again to start over"
