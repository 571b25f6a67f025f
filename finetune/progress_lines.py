"""Progress bars in a log file (nohup, SLURM, `| tee`): a plain line now and then, not a redraw 10 times a second.

tqdm redraws a bar by writing '\\r' and the bar again, up to 10 times a second; on a terminal that is one live line,
but in a file every redraw stays: a long run's log grew by megabytes on one endless line that `less` and editors
choke on. Where stderr is not a terminal, the command line puts `ProgressLines` in front of it: each redraw becomes
a line of its own, at most one per FINETUNE_PROGRESS_EVERY seconds (30 by default), plus each bar's last state as
it ends. It works on the stream, so every bar a run draws follows it: the training bar, the data check's and class
images' bars, sample's and eval's sampling bars, datasets' and transformers' bars. On a terminal nothing changes.
Bars that clear themselves on a terminal (the data check's, sampling's) ask `in_a_log()` and leave their last state
there instead: a log showed their 0% line and never said they finished.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, TextIO

from finetune.errors import FinetuneError

DEFAULT_SECONDS = 30.0
CURSOR_UP = "\x1b[A"  # tqdm moves up to a bar drawn below another (position=1 and on)


def seconds_between_lines() -> float:
    """FINETUNE_PROGRESS_EVERY, else DEFAULT_SECONDS: the least time between two progress lines in a log."""
    asked = os.environ.get("FINETUNE_PROGRESS_EVERY")
    if asked is None:
        return DEFAULT_SECONDS
    try:
        seconds = float(asked)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # NaN too
        raise FinetuneError(f"FINETUNE_PROGRESS_EVERY={asked}: give the seconds between progress lines in a log (e.g. 30), or unset it")
    return seconds


class ProgressLines:
    """A text stream in front of `stream` that writes tqdm's redraws ('\\r' + bar) as plain lines, at most one per
    `every` seconds, and the bar's last state when the bar ends (tqdm's closing '\\n'); clearing a bar writes nothing.
    Anything else passes through as it is."""

    def __init__(self, stream: TextIO, every: float, clock: Callable[[], float] = time.monotonic):
        self.stream, self.every, self.clock = stream, every, clock
        self._last_line_at = -float("inf")
        self._unwritten: str | None = None  # the latest redraw not yet written (too soon after the last line)
        self._after_redraw = False  # the last write was a redraw or a clear: a '\n' now is tqdm ending its bar

    def write(self, text: str) -> int:
        if not text:  # tqdm's moveto(0)
            return 0
        if text.startswith("\r") or text.replace(CURSOR_UP, "") == "":
            self._redraw(text.rsplit("\r", 1)[-1].replace(CURSOR_UP, "").rstrip())
        elif self._after_redraw and text.strip("\n") == "":  # a bar ending (leave=True): its last state, once
            if self._unwritten is not None:
                self._line(self._unwritten)
            self._after_redraw = False
        else:
            self._after_redraw = False
            self.stream.write(text)
        return len(text)

    def _redraw(self, bar: str) -> None:
        self._after_redraw = True
        if not bar:  # cleared (before a line is written above it, or a leave=False bar ending)
            self._unwritten = None
        elif self.clock() - self._last_line_at >= self.every:
            self._line(bar)
        else:
            self._unwritten = bar

    def _line(self, bar: str) -> None:
        self.stream.write(bar + "\n")
        self.stream.flush()
        self._last_line_at, self._unwritten = self.clock(), None

    def __getattr__(self, name):  # flush, fileno, isatty, encoding, buffer: the stream's own
        return getattr(self.stream, name)


def in_a_log() -> bool:
    """Whether progress goes to a log as plain lines (sys.stderr is a `ProgressLines`): tqdm's `leave` for a bar that
    clears itself on a terminal, so that in a log it ends on a line of its last state (`checking data folder photos: 100%|...|
    120/120 [00:03<00:00, ...]`) rather than on its 0% line."""
    return isinstance(sys.stderr, ProgressLines)


@contextlib.contextmanager
def progress_as_lines_in_logs():
    """While a command runs: sys.stderr, where it is not a terminal, as `ProgressLines` (given back after)."""
    stream = sys.stderr
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):  # no stream, or a closed one
        terminal = True
    if terminal or isinstance(stream, ProgressLines):
        yield
        return
    sys.stderr = ProgressLines(stream, seconds_between_lines())
    try:
        yield
    finally:
        if isinstance(sys.stderr, ProgressLines) and sys.stderr.stream is stream:
            sys.stderr = stream
