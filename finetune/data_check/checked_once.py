"""The data check of one `finetune train`, run once: the command checks the data before torch and the model stack load
(some 20 s of imports, after which a corrupt image was said), and `train()` checks it again for callers that do not come
through the command line; within `checks_kept` the second check takes the first one's result instead of decoding every
image again. A file changed between the two is caught as one changed while the run trains (finetune/data/files_as_checked.py)."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, TypeVar

Checked = TypeVar("Checked")

# The results of the checks made within `checks_kept`, by what was checked; None outside it: every check is made afresh
# (a test, a notebook or a benchmark may train on one folder several times, editing it in between).
_kept: dict[str, object] | None = None


@contextlib.contextmanager
def checks_kept() -> Iterator[None]:
    global _kept
    outer, _kept = _kept, {} if _kept is None else _kept
    try:
        yield
    finally:
        _kept = outer


def kept_check(key: str, check: Callable[[], Checked]) -> Checked:
    """`check()`'s result, made once per `key` within `checks_kept` (a check that raises is kept by no one: made again)."""
    if _kept is None:
        return check()
    if key not in _kept:
        _kept[key] = check()
    return _kept[key]  # type: ignore[return-value]
