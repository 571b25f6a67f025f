"""A checkpoint not written by finetune (downloaded, or shared with a recipe): accelerate reads the LR scheduler's state
(custom_checkpoint_0.pkl) with torch.load(weights_only=False), so a file made to run code ran it at `--resume`. One of
ours holds numbers alone there, in torch's zip format; one holding other objects, or of a format whose objects cannot be
listed before it is unpickled (torch's legacy format, a plain pickle), is refused in one line before anything is unpickled.
DeepSpeed's own files, which it unpickles whole too, are held to the objects DeepSpeed writes (finetune/checkpoints/pickles.py)."""

import shutil
from pathlib import Path

import pytest
import torch
from test_untrusted_checkpoints import RunsCodeWhenUnpickled

from finetune.errors import FinetuneError
from finetune.training import trainer


@pytest.mark.parametrize("written", [{}, {"_use_new_zipfile_serialization": False}, {"pickle_protocol": 4}], ids=["zip", "legacy-format", "protocol-4"])
def test_a_checkpoint_whose_scheduler_state_would_run_code_is_refused_before_it_is_unpickled(make_recipe, tmp_path, written):
    common = dict(train__max_steps=2, checkpoint__every_n_steps=2, validation__prompts=[])
    run = trainer.train(make_recipe(output_dir=str(tmp_path / "run"), **common)).output_dir
    shutil.copytree(run, tmp_path / "copy")
    scheduler_state = tmp_path / "copy" / "checkpoints" / "checkpoint-2" / "custom_checkpoint_0.pkl"
    marker = tmp_path / "code-ran"
    state = {**torch.load(scheduler_state, weights_only=True), "extra": RunsCodeWhenUnpickled(marker)}
    torch.save(state, scheduler_state, **written)  # legacy format, protocol 4's STACK_GLOBAL: torch's scan lists no names there
    with pytest.raises(FinetuneError) as raised:
        trainer.train(make_recipe(output_dir=str(tmp_path / "copy"), **{**common, "train__max_steps": 3}), resume="latest")
    assert not marker.exists()
    if written:
        assert str(raised.value).startswith(f"checkpoint {scheduler_state.parent}: custom_checkpoint_0.pkl is not the file accelerate writes (")
        return
    assert str(raised.value).startswith(f"checkpoint {scheduler_state.parent}: custom_checkpoint_0.pkl holds objects besides a scheduler's state (")
    assert "makedirs" in str(raised.value) and str(raised.value).endswith("resume only from checkpoints you wrote, or start a new run from its outputs")
    # The checkpoint as finetune wrote it resumes.
    assert trainer.train(make_recipe(output_dir=str(run), **{**common, "train__max_steps": 3}), resume="latest").final_step == 3


def test_deepspeeds_files_holding_objects_it_never_writes_are_refused_before_they_are_unpickled(tmp_path):
    """DeepSpeed unpickles its engine's files whole (weights_only=False) at a resume. Those it writes hold its loss scaler,
    its ZeRO stage and ZeRO-1/2's slice map beside tensors (as read from a ZeRO-2 launch's optimizer shard): these pass;
    anything else, or a file whose objects cannot be listed (protocol 4), is refused, nothing unpickled."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from finetune.checkpoints.checkpoint import DEEPSPEED_FOLDER
    from finetune.checkpoints.pickles import refuse_unknown_objects

    checkpoint = tmp_path / "checkpoint-2"
    (checkpoint / DEEPSPEED_FOLDER).mkdir(parents=True)
    shard = checkpoint / DEEPSPEED_FOLDER / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    fp16_scaler = DynamicLossScaler(init_scale=2**16, scale_window=1000, min_scale=1, delayed_shift=2, consecutive_hysteresis=False, dtype=torch.float16)
    written = {"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients, "fp16_scaler": fp16_scaler,
                                        "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}], "groups": [torch.ones(4)]}}  # fmt: skip
    torch.save(written, shard)
    refuse_unknown_objects(checkpoint, checkpoint / DEEPSPEED_FOLDER)

    marker = tmp_path / "code-ran"
    torch.save({**written, "extra": RunsCodeWhenUnpickled(marker)}, shard)
    with pytest.raises(FinetuneError) as raised:
        refuse_unknown_objects(checkpoint, checkpoint / DEEPSPEED_FOLDER)
    assert str(raised.value).startswith(f"checkpoint {checkpoint}: pytorch_model/{shard.name} holds objects DeepSpeed 0.19's checkpoints do not (")
    assert "makedirs" in str(raised.value) and "\n" not in str(raised.value)
    torch.save({**written, "extra": RunsCodeWhenUnpickled(marker)}, shard, pickle_protocol=4)
    with pytest.raises(FinetuneError, match=rf"pytorch_model/{shard.name} is not the file DeepSpeed writes"):
        refuse_unknown_objects(checkpoint, checkpoint / DEEPSPEED_FOLDER)
    assert not marker.exists()


def test_a_resume_checks_deepspeeds_files_before_accelerate_and_deepspeed_load_anything(make_recipe, tmp_path):
    """load_checkpoint, as under DeepSpeed (whose launch is slow: tests/test_deepspeed_zero2.py resumes a real one)."""
    from types import SimpleNamespace

    from finetune.checkpoints.checkpoint import load_checkpoint

    common = dict(train__max_steps=2, checkpoint__every_n_steps=2, validation__prompts=[])
    checkpoint = Path(trainer.train(make_recipe(output_dir=str(tmp_path / "run"), **common)).output_dir) / "checkpoints" / "checkpoint-2"
    (checkpoint / "pytorch_model").mkdir()
    torch.save({"extra": RunsCodeWhenUnpickled(tmp_path / "code-ran")}, checkpoint / "pytorch_model" / "mp_rank_00_model_states.pt")
    accelerator = SimpleNamespace(scaler=None, num_processes=1, load_state=lambda *args, **kwargs: pytest.fail("loaded before the check"))
    with pytest.raises(FinetuneError, match="pytorch_model/mp_rank_00_model_states.pt holds objects DeepSpeed 0.19's checkpoints do not"):
        load_checkpoint(accelerator, checkpoint)
