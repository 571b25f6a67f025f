"""Run the data check's per-image work on several threads, with a progress bar for long checks.

The check decodes every image in full and hashes its pixels (a 12 MP JPEG takes ~0.25 s of one core),
and training runs it again at every start, resume included (taking unchanged files from the check's record:
finetune/data_check/check_record.py). Pillow and hashlib release the GIL while
they decode, convert and hash, so threads check several images at once without pickling anything (nor
starting processes that import it all again). Results keep the images' order, so reports and duplicate findings are
the same on any number of threads.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

from tqdm.auto import tqdm

from finetune.distributed.process_env import first_on_its_machine, processes_on_this_machine
from finetune.errors import FinetuneError
from finetune.progress_lines import in_a_log

Item, Result = TypeVar("Item"), TypeVar("Result")

# Each thread holds one decoded image, and its upright copy where EXIF turns it: Pillow keeps RGB in 4 bytes a pixel,
# so ~50-100 MB at 12 MP (check-data's peak grew 67 MB a thread on phone photos), ~1.2-2.4 GB at 300 MP; hence a cap.
MAX_CHECK_THREADS = 8
# A check of this many images shows its progress bar from the start; a check of fewer, once it has run this many seconds:
# most end before (a few ms an image), but a 48 MP phone photo takes 0.64 s of one core: 30 of them some 20 s.
PROGRESS_FROM, PROGRESS_AFTER_SECONDS = 50, 3.0


def check_threads() -> int:
    """This process's share of the CPUs it may run on (the processes of one machine split them), at most
    MAX_CHECK_THREADS; FINETUNE_CHECK_THREADS sets it."""
    if asked := os.environ.get("FINETUNE_CHECK_THREADS"):
        if not asked.isdigit() or int(asked) < 1:
            raise FinetuneError(f"FINETUNE_CHECK_THREADS={asked}: give a number of threads (1 or more), or unset it for one per CPU")
        return int(asked)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes_here = processes_on_this_machine() or 1  # 1 without a launcher
    return max(1, min(MAX_CHECK_THREADS, cpus // processes_here))


def each_on_threads(function: Callable[[Item], Result], items: Sequence[Item], description: str) -> list[Result]:
    """[function(item) for item in items], computed on `check_threads()` threads."""
    delay = 0.0 if len(items) >= PROGRESS_FROM else PROGRESS_AFTER_SECONDS
    pool = ThreadPoolExecutor(check_threads(), thread_name_prefix="check")
    results = []
    try:
        with tqdm(total=len(items), desc=description, unit="image", delay=delay,
              disable=not first_on_its_machine(), leave=in_a_log()) as progress:  # one bar per machine
            for result in pool.map(function, items):
                results.append(result)
                progress.update()
    finally:
        pool.shutdown(cancel_futures=True)  # on an error or Ctrl-C, images not yet begun are not decoded
    return results
