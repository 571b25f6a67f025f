"""tests/forked.py's `run_forked`: whatever the call does, the child ends in os._exit and never returns into the test's
pytest (a child that went on would run the rest of the suite a second time, in the test's folders)."""

import os
import sys

from forked import run_forked


def test_a_call_returning_no_exit_code_ends_the_child_with_1_and_says_so():
    parent = os.getpid()
    ran = run_forked(lambda: "done")
    assert ran.returncode == 1 and "run_forked: the call returned 'done', not an exit code" in ran.output
    assert os.getpid() == parent


def test_the_call_s_exit_code_and_output_come_back():
    ran = run_forked(lambda: print("hello") or 3)
    assert (ran.returncode, ran.output) == (3, "hello\n")


def test_a_started_fork_runs_in_a_session_of_its_own_with_its_environment_and_files(tmp_path):
    """start_forked's child is a process group of its own (what os.killpg of a test's stop reaches), and what it is given
    is its own: the environment added, stdout and stderr in their files; wait() gives the call's exit code as Popen's."""
    from forked import start_forked

    def call() -> int:
        print(os.getsid(0) == os.getpid(), os.environ["FORKED_TEST"])
        print("said", file=sys.stderr)
        return 3

    started = start_forked(call, tmp_path / "out", tmp_path / "err", {"FORKED_TEST": "given"})
    assert started.wait(timeout=60) == 3 and started.poll() == 3
    assert (tmp_path / "out").read_text() == "True given\n" and (tmp_path / "err").read_text() == "said\n"
    assert "FORKED_TEST" not in os.environ and os.getsid(0) != started.pid
