"""DeepSpeed ZeRO-2 in 2 CPU processes (gloo), launched with the top-level accelerate_config.yaml as the README does:
checkpoints, a resume and the weight average. Apart from tests/test_distributed.py so that its launch and that file's
DDP launch can run on the two pytest workers side by side."""

from pathlib import Path

from diffusers import StableDiffusionPipeline
from ports import free_port
from safetensors.torch import load_file
from test_distributed import RESUME_IS_EXACT, assert_same_update, assert_same_weights, launch, lora_start, wait, write

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
from finetune.training.ema import EMA_FILE
from finetune.training.trainer import train


def test_deepspeed_zero2_trains_checkpoints_resumes_and_saves_the_single_process_adapter(make_recipe, tmp_path):
    # With a weight average: what is saved (and compared below) is the average, which the checkpoint keeps.
    common = dict(train__batch_size=1, train__max_steps=4, train__gradient_accumulation_steps=2, data__random_flip=True,
                  checkpoint__every_n_steps=2, train__ema_decay=0.5)  # fmt: skip
    uninterrupted = make_recipe(output_dir=str(tmp_path / "zero2"), **common)
    resumed = make_recipe(output_dir=str(tmp_path / "zero2-resumed"), **common)
    out = Path(uninterrupted.output_dir)
    checkpoint = out / "checkpoints" / "checkpoint-2"
    # One launch: the run, then a second run resumed from the first one's step 2.
    # The top-level accelerate_config.yaml (ZeRO-2, 2 processes), as the README's launch command gives it.
    top_level_config = ["--config_file", "accelerate_config.yaml", "--main_process_port", str(free_port())]
    wait(launch(top_level_config, write(uninterrupted, tmp_path / "zero2.yaml"), "--resume", checkpoint, write(resumed, tmp_path / "resumed.yaml")))
    assert (checkpoint / EMA_FILE).is_file()
    assert sorted(p.name for p in (checkpoint / "pytorch_model").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # one shard per process
    assert_same_weights(load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors"), exact=True)

    # The resumed run ends where the uninterrupted one did, bit for bit on the CPU: ZeRO-2's checkpoint holds each
    # process's optimizer shard and the average, and gloo reduces the gradients in a fixed order.
    adapter = load_file(out / LORA_WEIGHTS_NAME)
    assert_same_weights(load_file(Path(resumed.output_dir) / LORA_WEIGHTS_NAME), adapter, exact=RESUME_IS_EXACT)

    # The same global batch in one process gives the same adapter, which diffusers loads: the same update up to the order
    # of float sums (ZeRO-2's reduction, not one process's backward), compared as a whole (assert_same_update).
    single = make_recipe(output_dir=str(tmp_path / "single"), **{**common, "train__batch_size": 2})
    train(single)
    expected = load_file(Path(single.output_dir) / LORA_WEIGHTS_NAME)
    assert_same_update(adapter, expected, lora_start(expected))
    pipeline = StableDiffusionPipeline.from_pretrained(uninterrupted.model.pretrained)
    pipeline.load_lora_weights(str(out), weight_name=LORA_WEIGHTS_NAME)
    assert sum("lora" in name for name, _ in pipeline.unet.named_parameters()) == len(adapter)
