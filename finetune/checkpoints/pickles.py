"""The pickle files of a checkpoint that a resume unpickles whole, held to the objects their writers put in them.

accelerate reads the optimizer's, the random states' and the loss scaler's files weights-only (tensors, numbers and a
few known types), but the LR scheduler's (custom_checkpoint_<i>.pkl) with weights_only=False; DeepSpeed reads its
engine's files (the model states, each process's optimizer shard) with weights_only=False too (its
TorchCheckpointEngine.load). A file made to run code when unpickled would run it at `--resume`. torch.save writes a
protocol-2 pickle in a zip, whose objects are named in it and can be listed without unpickling anything
(`finetune.models.base_folder.pickled_objects`): a file holding an object its writer never writes, or one in another format
(where they cannot be listed so), is refused in one line before any file is unpickled.
"""

from __future__ import annotations

from pathlib import Path

from finetune.errors import FinetuneError
from finetune.models.base_folder import named_objects, pickled_objects

# The objects besides tensors and plain containers that DeepSpeed (0.19) writes into its checkpoints, by reading of its
# ZeRO-1/2, ZeRO-3 and bf16 optimizers' state_dict: the loss scaler (LossScaler; fp16's DynamicLossScaler), the stage,
# and ZeRO-1/2's and bf16's map of each parameter's slice of the flat partition. Its model states hold none.
DEEPSPEED_OBJECTS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})  # fmt: skip


def refuse_unknown_objects(checkpoint: Path, deepspeed_folder: Path) -> None:
    """Before a resume unpickles anything: the scheduler's state (finetune's own: numbers) holds no objects, DeepSpeed's files
    (under `deepspeed_folder`) none but DEEPSPEED_OBJECTS."""
    for scheduler in sorted(checkpoint.glob("custom_checkpoint_*.pkl")):
        if (objects := pickled_objects(scheduler)) is None:
            raise FinetuneError(f"checkpoint {checkpoint}: {scheduler.name} is not the file accelerate writes (torch's zip format: cut short, "
                                "or a pickle of another making), which resuming would unpickle (unpickling can run code): resume "
                                "from the checkpoint before it, or start a new run from its outputs")  # fmt: skip
        if objects:
            raise FinetuneError(f"checkpoint {checkpoint}: {scheduler.name} holds objects besides a scheduler's state ({named_objects(objects)}), "
                                "which resuming would unpickle (unpickling can run code): resume only from checkpoints you wrote, or start "
                                "a new run from its outputs")  # fmt: skip
    for engine_file in sorted(deepspeed_folder.glob("*.pt")):
        named = f"{deepspeed_folder.name}/{engine_file.name}"
        if (objects := pickled_objects(engine_file)) is None:
            raise FinetuneError(f"checkpoint {checkpoint}: {named} is not the file DeepSpeed writes (torch's zip format: cut short, or a pickle "
                                "of another making), which DeepSpeed's resume would unpickle (unpickling can run code): resume from the "
                                "checkpoint before it, or start a new run from its outputs")  # fmt: skip
        if unknown := sorted(set(objects) - DEEPSPEED_OBJECTS):
            raise FinetuneError(f"checkpoint {checkpoint}: {named} holds objects DeepSpeed 0.19's checkpoints do not ({named_objects(unknown)}), "
                                "which DeepSpeed's resume would unpickle (unpickling can run code): resume only from checkpoints you "
                                "wrote, or start a new run from its outputs (a LoRA: lora.init_from=CHECKPOINT)")  # fmt: skip
