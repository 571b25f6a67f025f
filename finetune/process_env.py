"""What `accelerate launch` (torchrun) tells each process through its environment, read without importing
torch: the recipe's warnings and the command's errors are said before torch loads (see `finetune.cli`)."""

from __future__ import annotations

import os


def first_on_its_machine() -> bool:
    """Whether this process says the lines said once per machine (errors, warnings, progress of per-machine
    work): local rank 0 under a launcher, or the only process. Every process of a launch checks the same
    recipe and files, so the others would repeat it. Files only the main process writes are said by it alone
    (`accelerator.is_main_process`): another machine's first process may not even see them on its disk."""
    return os.environ.get("LOCAL_RANK", "0") == "0"
