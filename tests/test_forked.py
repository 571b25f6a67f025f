"""tests/forked.py's `run_forked`: whatever the call does, the child ends in os._exit and never returns into the test's
pytest (a child that went on would run the rest of the suite a second time, in the test's folders)."""

import os

from forked import run_forked


def test_a_call_returning_no_exit_code_ends_the_child_with_1_and_says_so():
    parent = os.getpid()
    ran = run_forked(lambda: "done")
    assert ran.returncode == 1 and "run_forked: the call returned 'done', not an exit code" in ran.output
    assert os.getpid() == parent


def test_the_call_s_exit_code_and_output_come_back():
    ran = run_forked(lambda: print("hello") or 3)
    assert (ran.returncode, ran.output) == (3, "hello\n")
