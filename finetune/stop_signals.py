"""Which signal stopped a command: its stop line names it (Ctrl-C or SIGTERM) and the command exits as a shell
reports a process that signal ended, 128 + its number (130 for Ctrl-C's SIGINT, 143 for SIGTERM). Kept free of
torch: the CLI imports it before any command runs."""

from __future__ import annotations

import signal


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, systemd, a SLURM job's time limit) where Ctrl-C raises KeyboardInterrupt: the command stops
    as on Ctrl-C (training defers both to a step boundary), and its line says which of the two stopped it."""


def raise_terminated(signum, frame):
    raise Terminated


def interrupt_for(signum: int) -> KeyboardInterrupt:
    """What a stop by `signum` raises where it cannot wait (a second one during a save)."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def signal_of(stop: KeyboardInterrupt) -> int:
    return signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT


def signal_name(signum: int) -> str:
    return "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"


def exit_status(signum: int) -> int:
    """As a shell reports a process ended by `signum`: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)


START_OVER = "run the command again to start over"  # what running again does where a command's outputs are made anew


def stop_line(stop: KeyboardInterrupt, rerun: str = START_OVER) -> str:
    """What a command stopped outside training's own stop says (stderr, once for the run), `rerun` saying what running it again does."""
    return f"\nstopped ({signal_name(signal_of(stop))}): files written so far are kept; {rerun}"
