"""A resumed checkpoint's files that one process each reads (its random states, DeepSpeed's shard) are checked by every
process: a damaged one is the same line on each, so the first process of each machine, which says errors, says it. Checked
by process 1 alone, 3 processes resuming a checkpoint without random_states_1.pkl ended with no error line at all: process 1
stopped with its line unsaid, while process 0 went on into the run and waited for it until the launcher killed it."""

import json
from types import SimpleNamespace

import pytest
import torch

from finetune.checkpoints.checkpoint import DEEPSPEED_FOLDER, load_checkpoint
from finetune.checkpoints.run_files import STATE_FILE
from finetune.errors import FinetuneError


def loaded_by_process_0(checkpoint, processes: int = 3) -> list[str]:
    """load_checkpoint as process 0 of `processes` runs it (accelerate stood in for: what it would load is recorded)."""
    loaded = []
    accelerator = SimpleNamespace(scaler=None, process_index=0, num_processes=processes, gradient_accumulation_steps=1, step=0,
                                  load_state=lambda folder, **options: loaded.append(folder))  # fmt: skip
    load_checkpoint(accelerator, checkpoint)
    return loaded


def test_every_process_refuses_a_checkpoint_whose_files_for_another_process_are_missing_or_cut_short(tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    (checkpoint / DEEPSPEED_FOLDER).mkdir(parents=True)
    (checkpoint / STATE_FILE).write_text(json.dumps({"step": 2, "processes": 3}))
    for index in range(3):
        torch.save({"step": 2}, checkpoint / f"random_states_{index}.pkl")
        torch.save({}, checkpoint / DEEPSPEED_FOLDER / f"zero_pp_rank_{index}_mp_rank_00_optim_states.pt")
    assert loaded_by_process_0(checkpoint) == [str(checkpoint)]
    assert loaded_by_process_0(checkpoint, processes=2) == [str(checkpoint)]  # fewer processes now: random_states_2.pkl is not read
    (checkpoint / "random_states_1.pkl").unlink()
    shard = checkpoint / DEEPSPEED_FOLDER / "zero_pp_rank_2_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:40])  # cut short, as by a full disk
    with pytest.raises(FinetuneError, match=rf"^checkpoint {checkpoint} is damaged or incomplete \(random_states_1.pkl, "
                                            r"zero_pp_rank_2_mp_rank_00_optim_states.pt: missing or cut short\): move it out of"):
        loaded_by_process_0(checkpoint)
