"""Which signal stopped a command: its stop line names it (Ctrl-C or SIGTERM) and the command exits as a shell
reports a process that signal ended, 128 + its number (130 for Ctrl-C's SIGINT, 143 for SIGTERM). Kept free of
torch: the CLI imports it before any command runs."""

from __future__ import annotations

import signal
import sys


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, systemd, a SLURM job's time limit) where Ctrl-C raises KeyboardInterrupt: the command stops
    as on Ctrl-C (training defers both to a step boundary), and its line says which of the two stopped it."""


def raise_terminated(signum, frame):
    raise Terminated


def stop_outside_imports(signum, frame):
    """A command's handler of Ctrl-C and SIGTERM: the stop, raised at once (KeyboardInterrupt, Terminated), except while
    a module is imported (torch, diffusers and transformers import for seconds, lazily, in the middle of a command).
    Raised there, it went where an import's own error handling took it: torch's import swallowed it (the command ran
    on, unstopped), or left numpy half made, which failed later with a traceback ("cannot load module more than once per
    process"). There the stop is held until the outermost import returns, then raised where it returned to; a second
    stop while one is held is raised at once, as a second Ctrl-C is in training."""
    if not _held.signals and importing(frame):
        _held.signals.add(signum)
        _held.profile = sys.getprofile()
        sys.setprofile(_release_when_the_import_returns)  # this thread's only: the main one, where handlers run
        return
    stop = max(_held.signals | {signum})
    if _held.signals:
        _held.signals.clear()
        sys.setprofile(_held.profile)
    raise interrupt_for(stop)


def importing(frame) -> bool:
    """Whether `frame` (a signal handler's: the main thread's current one) runs inside an import."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


class _HeldStop:
    def __init__(self):
        self.signals: set[int] = set()  # the stops held until the import returns
        self.profile = None  # the profile function the hold replaced (None: none)


_held = _HeldStop()


def _release_when_the_import_returns(frame, event, arg) -> None:
    if event == "return" and frame.f_code.co_filename.startswith("<frozen importlib._bootstrap") and not importing(frame.f_back):
        sys.setprofile(_held.profile)
        signal.raise_signal(max(_held.signals))  # handled in the code the import returns to; the handler raises it


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
    """What a command stopped outside training's own stop says (stderr, once for the run), `rerun` saying what running it again
    does, unless the code the stop interrupted said it (`with_next_step`)."""
    return f"\nstopped ({signal_name(signal_of(stop))}): files written so far are kept; {getattr(stop, 'next_step', None) or rerun}"


def with_next_step(stop: KeyboardInterrupt, next_step: str) -> KeyboardInterrupt:
    """`stop`, its line (`stop_line`) saying `next_step` instead of its command's word on running again: the code it
    interrupted knows what is left (the end of a training run: nothing to train, its outputs or final samples to write)."""
    stop.next_step = next_step
    return stop
