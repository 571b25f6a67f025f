"""Whether a checkpoint can be resumed by this run, read from its trainer state (JSON) and its file names alone, without
torch: `finetune train` says a resume with nothing left to train, of other trained weights, or of another engine before its
data check decodes every image (minutes for a large folder); train() checks again (finetune/training/trainer.py)."""

from __future__ import annotations

from pathlib import Path

from finetune.checkpoints.earlier_run import finish_a_finished_runs_saves
from finetune.checkpoints.run_files import checkpoint_step, read_state
from finetune.config.methods import TEXT_ENCODER_TARGETS
from finetune.counts import counted
from finetune.errors import FinetuneError

DEEPSPEED_FOLDER = "pytorch_model"  # where accelerate has DeepSpeed's engine write a checkpoint's weights and optimizer


def check_resumable(checkpoint: Path, max_steps: int | None, settings: dict | None = None) -> None:
    """Before anything loads: a checkpoint at or past train.max_steps has nothing left to train (None: the
    length is in epochs, checked once the data is read: `finetune.training.run_length`), and one of other trained
    weights or optimizer groups than the recipe's `settings` (flat) cannot continue."""
    saved = read_state(checkpoint).get("recipe")
    if saved is not None and settings is not None:  # (a checkpoint from before the recipe was stored has none)
        before, now = trained_structure(saved), trained_structure(settings)
        keys = ["method"] if before["method"] != now["method"] else [key for key in now if before.get(key) != now[key]]
        # The keys the user changed (the text encoder's LoRA+ split follows lora.train_text_encoder, unchanged itself).
        keys = [key for key in keys if saved.get(key) != settings.get(key)] or keys
        changed = [f"{key} {saved.get(key)} -> {settings.get(key)}" for key in keys]
        if changed:
            raise FinetuneError(
                f"{checkpoint} trained other weights or optimizer groups than this recipe would ({', '.join(changed)}): resume with "
                "the settings that wrote it, or start a new run (another output_dir, or --overwrite)"
            )
    step = checkpoint_step(checkpoint)
    if max_steps is not None and step >= max_steps:
        if settings is not None:  # a finished run's (its last checkpoint is saved after its outputs): a kill may have cut that save short
            checkpoint = finish_a_finished_runs_saves(checkpoint, Path(settings["output_dir"]))
        raise FinetuneError(
            f"{checkpoint} is at step {step} and train.max_steps is {max_steps}: nothing left to train; "
            f"raise train.max_steps to continue (e.g. train.max_steps={step + max(step // 2, 1)})"
        )


def trained_structure(settings: dict) -> dict:
    """What decides which weights a run trains and how its optimizer groups them, from flat settings (a
    recipe's, or the one a checkpoint keeps); everything else may change at a resume."""
    # Keyed by the recipe key that decides each (the error shows those keys' values); compared as below.
    method = settings.get("method")
    adapter = settings.get("dreambooth.adapter") if method == "dreambooth" else method
    text_encoder = bool(settings.get(f"{method}.train_text_encoder")) if method in ("lora", "full", "dreambooth") else False
    structure = {"method": method, "dreambooth.adapter": adapter, f"{method}.train_text_encoder": text_encoder}
    if adapter == "lora":
        te_ratio = settings.get("lora.loraplus_text_encoder_lr_ratio") or settings.get("lora.loraplus_lr_ratio")
        structure.update({
            "lora.rank": settings.get("lora.rank"),
            "lora.conv_rank": settings.get("lora.conv_rank"),
            # As sets: peft adapts the layers in the model's order, whatever the list's (a resume listing them otherwise was refused).
            "lora.target_modules": sorted(set(settings.get("lora.target_modules") or [])),
            # A checkpoint from before the key trained the attention projections, today's default.
            "lora.text_encoder_target_modules": text_encoder and (settings.get("lora.text_encoder_target_modules") or TEXT_ENCODER_TARGETS),
            "lora.use_dora": bool(settings.get("lora.use_dora")),  # DoRA's magnitudes are weights of their own
            "lora.loraplus_lr_ratio": settings.get("lora.loraplus_lr_ratio") is not None,  # on or off: the value may change
            "lora.loraplus_text_encoder_lr_ratio": text_encoder and te_ratio is not None,
        })  # fmt: skip
    if method == "controlnet":
        structure["controlnet.unlock_unet_decoder"] = bool(settings.get("controlnet.unlock_unet_decoder"))
        structure["controlnet.only_mid_control"] = bool(settings.get("controlnet.only_mid_control"))  # freezes the down-block zero convs
    return structure


def deepspeed_stage_of(checkpoint: Path) -> int | None:
    """The ZeRO stage whose files hold a checkpoint's weights and optimizer: 3 (each process's shard of the
    weights), 2 (the weights whole; ZeRO-1 writes the same files), or None: written without DeepSpeed."""
    folder = checkpoint / DEEPSPEED_FOLDER
    if not folder.is_dir():
        return None
    return 3 if any(folder.glob("zero_pp_rank_*_model_states.pt")) else 2


def check_same_engine(checkpoint: Path, saved_processes: int | None, stage: int | None, processes: int) -> None:
    """DeepSpeed reads its checkpoints only at the ZeRO stage and number of processes that wrote them, and
    neither DeepSpeed nor accelerate reads the other's: one line saying so, instead of an assertion or a
    "damaged checkpoint" from deep inside either. `stage`: this run's ZeRO stage, None without DeepSpeed."""
    written = deepspeed_stage_of(checkpoint)
    if written is None and stage is None:
        return  # without DeepSpeed any number of processes resumes (the batch change is a warning)
    if written is not None and stage is not None and (written == 3) == (stage == 3) and saved_processes in (None, processes):
        return

    def engine(zero: int | None, count: int | None) -> str:
        return "without DeepSpeed" if zero is None else f"under DeepSpeed ZeRO-{zero} by {counted(count, 'process', 'processes') if count else '? processes'}"

    raise FinetuneError(
        f"checkpoint {checkpoint} was written {engine(written, saved_processes)}, this run is {engine(stage, processes)}: "
        "DeepSpeed resumes only its own checkpoints, at the ZeRO stage and number of processes that wrote them; "
        "resume it as it was written, or start a new run from the outputs it holds (a LoRA: lora.init_from=CHECKPOINT)"
    )
