"""A process that is not its machine's first waits for its first's error line (`finetune.distributed.error_exchange.says_its_error`):
torchrun's agent ends it there (SIGTERM) as its first, failing, exits, or Ctrl-C does. The stop escaped, and its own line,
which may differ from its first's, was said by no one: now it reads its first's line once, without waiting, and says its
own unless that is the same."""

from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch

import finetune.distributed.error_exchange as error_exchange
from finetune.stop_signals import Terminated

SAID = "finetune/error-of-machine/0"


class StoppedStore:
    """The launch's store as a process stopped in its wait finds it: `posted` its first's line (None: not posted), `gone`
    where it no longer answers."""

    def __init__(self, posted: str | None, gone: bool = False):
        self.lines = {} if posted is None else {SAID: posted.encode()}
        self.gone, self.timeout, self.timeouts, self.reads = gone, timedelta(minutes=30), [], 0

    def wait(self, keys, timeout):
        raise Terminated()  # the agent's SIGTERM, which the CLI's handler raises at once

    def set_timeout(self, timeout):
        self.timeouts.append(timeout)
        self.timeout = timeout

    def check(self, keys):
        if self.gone:
            raise RuntimeError("Connection reset by peer")
        return all(key in self.lines for key in keys)

    def get(self, key):
        return self.lines[key]

    def add(self, key, amount):
        self.reads += amount
        return self.reads


@pytest.fixture
def second_process(monkeypatch):
    """Machine 0's second process of a 2-process launch under torchrun's agent store."""
    monkeypatch.setattr(error_exchange, "_store_kept_for_readers", None)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    for name, value in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "GROUP_RANK": "0",
                        "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)

    def stopped_with(store: StoppedStore, line: str):
        monkeypatch.setattr(torch.distributed.distributed_c10d, "_get_default_store", lambda: store)
        try:
            said = error_exchange.says_its_error(line)
        except KeyboardInterrupt:  # (pytest would take it for the test run's own Ctrl-C)
            return "raised the stop"
        assert store.timeout == timedelta(minutes=30) and store.timeouts[0] == error_exchange.GLANCE_WAIT  # one bounded read
        return said

    return stopped_with


def test_a_process_stopped_while_waiting_for_its_firsts_line_says_its_own_where_it_differs(second_process):
    store = StoppedStore(posted="the weights hold NaN")
    assert second_process(store, "no space left on the disk of outputs/lora") is True
    assert store.reads == 1  # counted as read: the process keeping the store up need not wait for it
    assert second_process(StoppedStore(posted="the weights hold NaN"), "the weights hold NaN") is False  # its first said it


def test_a_process_stopped_where_its_firsts_line_cannot_be_read_says_its_own(second_process, monkeypatch):
    assert second_process(StoppedStore(posted=None), "the weights hold NaN") is True
    assert second_process(StoppedStore(posted="the weights hold NaN", gone=True), "the weights hold NaN") is True
    now = [0.0]
    monkeypatch.setattr(error_exchange, "time", SimpleNamespace(monotonic=lambda: now[0], sleep=lambda seconds: now.__setitem__(0, now[0] + seconds)))
    error_exchange.wait_for_error_readers()
    assert now[0] == 0  # stopped, it keeps the store up for no one: it leaves at once
