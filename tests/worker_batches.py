"""What a data-loader worker makes of a micro-batch, and how it was started, importable without the test modules (and so
without the trainer's libraries): tests/test_spawned_workers.py runs these in spawned processes, which import this module
to call them."""

import json
import os
from pathlib import Path

# Set in the test's process: a forked worker has it too (a copy of that process's memory), a spawned one imports this
# module afresh and has False.
IN_THE_TEST_PROCESS = False
WORKER_NOTES = "FINETUNE_TEST_WORKER_NOTES"  # the folder where each worker notes how it started (inherited either way)


def noting_how_it_started(worker_id: int) -> None:
    """The trainer's worker_init_fn, after writing $FINETUNE_TEST_WORKER_NOTES/<pid>: whether this worker has the test
    process's memory (forked) or not (spawned)."""
    from finetune.distributed.stopping import leave_stop_signals_to_the_trainer

    Path(os.environ[WORKER_NOTES], str(os.getpid())).write_text(json.dumps(IN_THE_TEST_PROCESS))
    leave_stop_signals_to_the_trainer(worker_id)


def first_batch(dataset, keys, collate_fn):
    return collate_fn([dataset[key] for key in keys])


MODEL_LIBRARIES = ("diffusers", "transformers", "peft", "bitsandbytes", "accelerate", "deepspeed")


def model_libraries_loaded() -> list[str]:
    """The model stack's libraries this process has imported: a worker needs none of them to make batches."""
    import sys

    return [name for name in MODEL_LIBRARIES if name in sys.modules]
