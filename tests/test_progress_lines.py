"""Progress bars in a log file (nohup, SLURM, `| tee`): plain lines now and then, not tqdm's redraw ('\\r' + the bar)
up to 10 times a second, which made a log of megabytes on one endless line. A terminal keeps its live bar."""

import fcntl
import io
import os
import pty
import select
import struct
import sys
import termios

import yaml
from forked import run_forked
from tqdm import tqdm

from finetune.cli.main import main
from finetune.data_check.threads import each_on_threads
from finetune.progress_lines import ProgressLines, progress_as_lines_in_logs



def test_a_training_run_logged_to_a_file_writes_a_few_plain_progress_lines(make_recipe, tmp_path, monkeypatch):
    # 10 steps with a checkpoint and validation grid mid-run (lines written above the bar): tqdm redrew it at every step, so
    # 10 steps are 10 redraws or more, past the 4 lines allowed below (60 steps showed no more and took a minute of the suite).
    recipe = tmp_path / "recipe.yaml"
    settings = make_recipe(train__max_steps=10, checkpoint__every_n_steps=5, validation__prompts=["a shape"], validation__every_n_steps=5)
    recipe.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    monkeypatch.delenv("FINETUNE_PROGRESS_EVERY", raising=False)
    # As `nohup finetune train recipe.yaml > train.log 2>&1` leaves it: stdout and stderr one file (a process forked from this one:
    # a fresh interpreter's imports took 10 CPU s).
    done = run_forked(lambda: main(["train", str(recipe)]))
    text = done.output
    assert done.returncode == 0, text
    assert "\r" not in text and "\x1b" not in text, repr(text[-2000:])
    bars = [line for line in text.splitlines() if line.startswith("training:")]
    # Its end, and a line per 30 s before it (this run takes less). Its start falls within 30 s of the last line of the
    # grid's bar at step 0, so it is not written.
    assert 1 <= len(bars) <= 4, bars
    assert bars[-1].startswith("training: 100%") and " 10/10 " in bars[-1] and "loss=" in bars[-1]
    assert "saved " in text and text.rstrip().splitlines()[-1].startswith("output: ")
    # The grids at step 0 (validation.at_start), mid-run and the final samples each end on their bar's last line, above their path:
    # they drew for 6-30 s (2 CPU cores, the quickstart's) with no bar.
    steps = settings.validation.num_inference_steps * settings.validation.images_per_prompt * len(settings.validation.prompts)
    for step in (0, 5, 10):
        grid = [line for line in text.splitlines() if line.startswith(f"validation grid (step {step}):")]
        assert grid and grid[-1].startswith(f"validation grid (step {step}): 100%") and f" {steps}/{steps} " in grid[-1], text
        after = text.splitlines()[text.splitlines().index(grid[-1]) + 1]
        assert after == f"samples: {tmp_path / 'run' / 'samples' / f'step-{step:06d}.png'}", text
    assert len(text) < 3000, len(text)


def test_redraws_become_a_line_per_interval_and_the_bars_last_state():
    now = [0.0]
    log = io.StringIO()
    lines = ProgressLines(log, every=10, clock=lambda: now[0])
    with tqdm(total=100, desc="training", file=lines, mininterval=0, ascii=True) as bar:
        for step in range(100):
            now[0] += 1  # a step a second: tqdm redraws at each
            bar.update()
            if step == 49:
                bar.write("saved checkpoint-50", file=lines)  # clears the bar, writes above it, redraws it
    with tqdm(total=5, desc="checking", file=lines, mininterval=0, leave=False) as bar:  # cleared at its end
        bar.update(5)
    text = log.getvalue()
    assert "\r" not in text
    written = text.splitlines()
    assert "saved checkpoint-50" in written
    bars = [line for line in written if line.startswith("training")]
    assert 10 <= len(bars) <= 12, written  # 0%, one per 10 s, 100%
    assert " 100/100 " in bars[-1] and bars.count(bars[-1]) == 1
    assert [line for line in written if line.startswith("checking")] == []  # drawn within 10 s of the last line, then cleared


def test_a_terminal_keeps_the_live_bar(monkeypatch):
    def live_bar(terminal):
        assert sys.stderr is terminal
        with tqdm(total=5, desc="live", mininterval=0) as bar:
            for _ in range(5):
                bar.update()

    drawn = drawn_on_a_terminal(monkeypatch, live_bar)
    assert drawn.count("\rlive:") >= 5, repr(drawn)  # redrawn in place at each update


def drawn_on_a_terminal(monkeypatch, draw) -> str:
    """What `draw(terminal)` writes to stderr when it is a terminal (a pty of 80 columns) and progress_as_lines_in_logs is on."""
    reader, writer = pty.openpty()
    fcntl.ioctl(writer, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a new pty is 0x0: tqdm drew nothing there
    terminal = os.fdopen(writer, "w")
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress_as_lines_in_logs():
        draw(terminal)
    terminal.flush()
    drawn = ""
    while select.select([reader], [], [], 0.5)[0]:
        drawn += os.read(reader, 65536).decode()
    terminal.close()
    os.close(reader)
    return drawn


def test_a_self_clearing_bar_ends_on_a_line_in_a_log_and_leaves_nothing_on_a_terminal(monkeypatch):
    # The data check's bar clears itself on a terminal; in a log it showed its 0% line only, never that it finished.
    monkeypatch.delenv("FINETUNE_PROGRESS_EVERY", raising=False)
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    with progress_as_lines_in_logs():
        each_on_threads(lambda item: item, range(60), "checking images")
    bars = [line for line in log.getvalue().splitlines() if line.startswith("checking images")]
    assert len(bars) == 2 and " 0/60 " in bars[0] and bars[-1].startswith("checking images: 100%") and " 60/60 " in bars[-1], bars

    drawn = drawn_on_a_terminal(monkeypatch, lambda terminal: each_on_threads(lambda item: item, range(60), "checking images"))
    assert "checking images" in drawn and "\n" not in drawn and drawn.endswith("\r"), repr(drawn)  # drawn, then cleared


def test_a_bad_interval_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_PROGRESS_EVERY", "often")
    assert main(["check-data", "--image-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: FINETUNE_PROGRESS_EVERY=often: give the seconds between progress lines in a log (e.g. 30), or unset it"
    )


def test_the_sampling_bar_follows_the_same_rule_with_one_last_line_per_command(capsys, tiny_model, tmp_path):
    """Prompts of other steps, and images past one call's pixels, are several pipeline calls: diffusers' bar of each
    had left a line of its own (one per 2 SD1.5 images at 512 px), where one says the command finished."""
    prompts = ["--prompt", "a", "--prompt", "b --s 2"]  # two calls: prompts of other steps are not batched together
    assert main(["sample", "--base", str(tiny_model), *prompts, "--steps", "3", "--num-images", "2", "--out", str(tmp_path / "s")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err, repr(err)
    bars = [line for line in err.splitlines() if line.startswith("sampling:")]
    assert len(bars) == 2 and bars[0].startswith("sampling:   0%"), bars  # its first state, and its last: 2 x 3 + 2 x 2 steps
    assert bars[-1].startswith("sampling: 100%") and " 10/10 " in bars[-1], bars
