"""The data check runs on several threads: the same report as one thread, a progress bar for long checks (one per
machine), and an error or Ctrl-C stops it without decoding the images not yet begun."""

import itertools
import threading
import time

import pytest

from finetune.config import DataConfig
from finetune.data.sources import read_examples
from finetune.data_check import check as check_data
from finetune.data_check import threads as check_threads
from finetune.data_check.check import inspect_examples
from finetune.data_check.threads import each_on_threads
from finetune.errors import FinetuneError
from odd_images import write_odd_folder


@pytest.fixture
def odd_folder(tmp_path):
    return write_odd_folder(tmp_path / "odd")


def report_of(folder, monkeypatch, threads):
    monkeypatch.setenv("FINETUNE_CHECK_THREADS", str(threads))
    config = DataConfig(image_dir=str(folder), resolution=64)
    return inspect_examples(read_examples(config), config, "odd")


def test_threads_give_the_report_of_one_thread(odd_folder, monkeypatch):
    seen_threads = set()
    inspect = check_data.inspect
    meeting = None  # threaded: the first two images wait for each other, so two threads must check them, however busy the host

    def inspect_slowly(example, config, record=None):
        seen_threads.add(threading.get_ident())
        if meeting is not None and next(first_two) < 2:
            meeting.wait()
        time.sleep(0.02)  # and then more threads take the images after them
        return inspect(example, config, record)

    monkeypatch.setattr(check_data, "inspect", inspect_slowly)
    serial = report_of(odd_folder, monkeypatch, threads=1)
    assert len(seen_threads) == 1
    seen_threads.clear()
    meeting, first_two = threading.Barrier(2, timeout=30), itertools.count()
    threaded = report_of(odd_folder, monkeypatch, threads=4)
    assert len(seen_threads) > 1
    assert threaded.lines() == serial.lines()  # findings in the same order, duplicates named the same way
    checked = lambda report: [(e.source, e.caption, e.size, e.digest, e.file_stamp) for e in report.usable]  # noqa: E731
    assert checked(threaded) == checked(serial)
    assert len(serial.usable) == 9 and len(serial.findings) > 9  # the odd folder's findings, not an empty report


def test_a_long_check_shows_progress_on_the_machines_first_process_only(odd_folder, monkeypatch, capsys):
    monkeypatch.setattr(check_threads, "PROGRESS_FROM", 5)
    report_of(odd_folder, monkeypatch, threads=2)
    assert "checking odd" in capsys.readouterr().err
    monkeypatch.setenv("LOCAL_RANK", "1")
    report_of(odd_folder, monkeypatch, threads=2)
    assert "checking odd" not in capsys.readouterr().err
    monkeypatch.setattr(check_threads, "PROGRESS_FROM", 50)  # the odd folder's 13 images are below it ...
    monkeypatch.setattr(check_threads, "PROGRESS_AFTER_SECONDS", 3600)  # ... and checked well within this
    monkeypatch.setenv("LOCAL_RANK", "0")
    report_of(odd_folder, monkeypatch, threads=2)
    assert "checking odd" not in capsys.readouterr().err


def test_a_check_of_few_images_shows_progress_once_it_runs_long(odd_folder, monkeypatch, capsys):
    """30 phone photos of 48 MP (some 20 s on one core) are fewer than PROGRESS_FROM, and were checked
    without a word: such a check's bar shows once it has run PROGRESS_AFTER_SECONDS (here at once)."""
    monkeypatch.setattr(check_threads, "PROGRESS_FROM", 50)
    monkeypatch.setattr(check_threads, "PROGRESS_AFTER_SECONDS", 0.0)
    report_of(odd_folder, monkeypatch, threads=2)
    assert "checking odd" in capsys.readouterr().err
    monkeypatch.setenv("LOCAL_RANK", "1")  # still one bar per machine
    report_of(odd_folder, monkeypatch, threads=2)
    assert "checking odd" not in capsys.readouterr().err


def test_an_error_stops_the_check_without_running_the_rest(monkeypatch):
    monkeypatch.setenv("FINETUNE_CHECK_THREADS", "2")
    started = []

    def check(item):
        started.append(item)
        if item == 0:
            raise KeyboardInterrupt  # as Ctrl-C arrives in the main thread, or any error of one image's check
        time.sleep(0.02)
        return item

    with pytest.raises(KeyboardInterrupt):
        each_on_threads(check, list(range(200)), "checking")
    for thread in threading.enumerate():  # a thread still in its image finishes it; none starts another (left running, all 200 would)
        if thread.name.startswith("check"):
            thread.join(timeout=60)
    assert len(started) < 20


def test_processes_of_one_machine_share_its_cpus(monkeypatch):
    monkeypatch.delenv("FINETUNE_CHECK_THREADS", raising=False)
    monkeypatch.setattr(check_threads.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert check_threads.check_threads() == check_threads.MAX_CHECK_THREADS
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert check_threads.check_threads() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert check_threads.check_threads() == 1
    monkeypatch.setenv("FINETUNE_CHECK_THREADS", "3")
    assert check_threads.check_threads() == 3
    for wrong in ("auto", "0"):
        monkeypatch.setenv("FINETUNE_CHECK_THREADS", wrong)
        with pytest.raises(FinetuneError, match=rf"^FINETUNE_CHECK_THREADS={wrong}: give a number of threads \(1 or more\)"):
            check_threads.check_threads()
