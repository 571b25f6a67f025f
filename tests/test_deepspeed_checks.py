"""What a run under DeepSpeed refuses (finetune.distributed.deepspeed_checks), in this process: accelerate's launch settings are
environment variables, and each refusal comes before anything loads, so no launch (nor DeepSpeed itself) is needed."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from finetune.checkpoints.checkpoint import DEEPSPEED_FOLDER
from finetune.checkpoints.run_files import STATE_FILE
from finetune.distributed.deepspeed_checks import check_deepspeed_recipe
from finetune.distributed.processes import configure_deepspeed
from finetune.errors import FinetuneError
from finetune.training.trainer import train

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "deepspeed"


@pytest.fixture
def launched_with(monkeypatch):
    """Set accelerate's environment as `accelerate launch --use_deepspeed --deepspeed_config_file CONFIG` does."""

    def launch(config: str) -> None:
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(CONFIGS / config))

    return launch


def test_deepspeed_refuses_what_it_cannot_do(make_recipe):
    for switch, overrides, modules in (("lora.train_text_encoder", {}, "unet, text_encoder"), ("full.train_text_encoder", {"method": "full"}, "unet, text_encoder"),
                                       ("controlnet.unlock_unet_decoder", {"method": "controlnet"}, "controlnet, unet")):  # fmt: skip
        with pytest.raises(FinetuneError, match=rf"^DeepSpeed trains one model per run, this recipe trains 2 \({modules}\): set {switch} to false, or"):
            check_deepspeed_recipe(make_recipe(**overrides), modules.split(", "), {})
        make_recipe(**overrides, **{switch.replace(".", "__"): False})  # a key the recipe has
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    for name, lr in (("adamw8bit", 1e-4), ("prodigy", 1.0)):  # offload runs DeepSpeed's CPU Adam in their place
        with pytest.raises(FinetuneError, match=f"optimizer.name {name} with DeepSpeed optimizer offload"):
            check_deepspeed_recipe(make_recipe(optimizer__name=name, optimizer__lr=lr), ["unet"], offload)
    for config in ({}, offload):  # with offload too: its line would send it to a config that refuses it
        with pytest.raises(FinetuneError, match="^optimizer.name adafactor with DeepSpeed: ZeRO gives the optimizer its shard .* or launch without DeepSpeed$"):
            check_deepspeed_recipe(make_recipe(optimizer__name="adafactor"), ["unet"], config)
    with pytest.raises(FinetuneError, match="^lora.max_norm with DeepSpeed: .* launch without DeepSpeed, or set lora.max_norm: null$"):
        check_deepspeed_recipe(make_recipe(lora__max_norm=1.0), ["unet"], {})
    check_deepspeed_recipe(make_recipe(), ["unet"], offload)


def test_the_refusals_come_before_the_data_and_the_base_model_are_read(make_recipe, launched_with, tmp_path):
    """train() under the launch's settings refuses each of them before it looks for the base model (here there is none:
    a later refusal would be "not found"), from the method's models as the recipe names them (DreamBooth's adapter's
    too), and the offload config's optimizer as accelerate's plugin reads that file."""
    missing = dict(model__pretrained=str(tmp_path / "no-such-model"))
    concept = {"instance_dir": str(tmp_path), "instance_prompt": "a sks shape", "class_prompt": "a shape"}
    refused = [
        ("zero2.json", dict(lora__train_text_encoder=True), r"this recipe trains 2 \(unet, text_encoder\): set lora.train_text_encoder"),
        ("zero3.json", dict(method="dreambooth", data__image_dir=None, dreambooth={"concepts": [concept], "train_text_encoder": True}),
         r"this recipe trains 2 \(unet, text_encoder\): set dreambooth.train_text_encoder"),
        ("zero2.json", dict(method="controlnet", controlnet__unlock_unet_decoder=True), r"this recipe trains 2 \(controlnet, unet\)"),
        ("zero2.json", dict(lora__max_norm=1.0), "^lora.max_norm with DeepSpeed"),
        ("zero2.json", dict(optimizer__name="adafactor"), "^optimizer.name adafactor with DeepSpeed"),
        ("zero2_offload.json", dict(optimizer__name="adamw8bit"), "^optimizer.name adamw8bit with DeepSpeed optimizer offload"),
    ]
    for config, overrides, message in refused:
        launched_with(config)
        with pytest.raises(FinetuneError, match=message):
            train(make_recipe(**missing, **overrides))
    with pytest.raises(FinetuneError, match="no-such-model"):  # what the runs above would have said next
        train(make_recipe(**missing))


def test_a_resume_from_another_engines_checkpoint_is_refused_before_anything_loads(make_recipe, launched_with, tmp_path, monkeypatch):
    """The checkpoint's ZeRO stage (its files) and processes (its state) against this launch's, before the base is looked for."""
    checkpoint = tmp_path / "checkpoint-2"
    (checkpoint / DEEPSPEED_FOLDER).mkdir(parents=True)
    (checkpoint / DEEPSPEED_FOLDER / "zero_pp_rank_0_mp_rank_00_model_states.pt").touch()
    (checkpoint / STATE_FILE).write_text(json.dumps({"step": 2, "processes": 2}))
    recipe = make_recipe(model__pretrained=str(tmp_path / "no-such-model"))
    with pytest.raises(FinetuneError, match=rf"^checkpoint {checkpoint} was written under DeepSpeed ZeRO-3 by 2 processes, this run is without DeepSpeed:"):
        train(recipe, resume=str(checkpoint))
    launched_with("zero2.json")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FinetuneError, match="ZeRO-3 by 2 processes, this run is under DeepSpeed ZeRO-2 by 2 processes:"):
        train(recipe, resume=str(checkpoint))
    launched_with("zero3.json")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(FinetuneError, match="ZeRO-3 by 2 processes, this run is under DeepSpeed ZeRO-3 by 4 processes:"):
        train(recipe, resume=str(checkpoint))


def test_deepspeed_takes_the_batch_accumulation_and_clipping_from_the_recipe(make_recipe):
    config = {"train_batch_size": "auto", "gradient_accumulation_steps": "auto"}
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2,
                                  state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))
    configure_deepspeed(accelerator, make_recipe(train__batch_size=3, train__gradient_accumulation_steps=2, train__max_grad_norm=0.5))
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"], config["train_batch_size"], config["gradient_clipping"]) == (3, 2, 12, 0.5)


def test_deepspeeds_untested_optimizer_line_is_left_out_for_the_optimizers_tested_under_zero(make_recipe, launched_with, tmp_path, monkeypatch, caplog):
    """DeepSpeed logs "untested optimizer" for every optimizer outside its list, whatever its config says (accelerate sets
    zero_allow_untested_optimizer for each it is handed, which only lets the run start): the line is left out for the
    8-bit optimizers and Prodigy, tested under ZeRO here, and said for any other; DeepSpeed's other lines are kept.
    (adamw is on DeepSpeed's own list.)
    DeepSpeed's own check, as its engine calls it on the optimizer finetune builds, after the launch's checks."""
    import logging

    import deepspeed.runtime.engine
    import deepspeed.runtime.zero.utils
    import torch

    from finetune.optim.optimizers import build_optimizer

    monkeypatch.setattr(deepspeed.runtime.zero.utils, "dist", SimpleNamespace(get_rank=lambda: 0))  # no process group here
    engine = SimpleNamespace(get_data_types=lambda: (torch.float32, torch.float32), zero_optimization=lambda: True, zero_optimization_stage=lambda: 2,
                             zero_allow_untested_optimizer=lambda: True, zero_cpu_offload=lambda: False, global_rank=0)  # fmt: skip
    logger = logging.getLogger("DeepSpeed")  # it does not pass its records on to the root logger
    logger.addHandler(caplog.handler)
    launched_with("zero2.json")
    said = {}
    try:
        for name, lr in (("adamw8bit", 1e-4), ("lion8bit", 1e-4), ("prodigy", 1.0), ("adamw", 1e-4)):
            recipe = make_recipe(model__pretrained=str(tmp_path / "no-such-model"), optimizer__name=name, optimizer__lr=lr)
            with pytest.raises(FinetuneError, match="no-such-model"):  # past the launch's checks
                train(recipe)
            caplog.clear()
            optimizer = build_optimizer(recipe.optimizer, [torch.nn.Parameter(torch.zeros(4096))], sharded=True)  # as the trainer builds it under ZeRO
            deepspeed.runtime.engine.DeepSpeedEngine._do_optimizer_sanity_check(engine, optimizer)
            logger.warning("another DeepSpeed warning")
            said[name] = [record.getMessage() for record in caplog.records]
        # After adamw (on DeepSpeed's own list) the line is said again for an optimizer on neither list: every other
        # optimizer the recipe names is tested under ZeRO or refused with DeepSpeed (Adafactor), so torch's SGD stands in.
        caplog.clear()
        deepspeed.runtime.engine.DeepSpeedEngine._do_optimizer_sanity_check(engine, torch.optim.SGD([torch.nn.Parameter(torch.zeros(4))]))
        said["sgd"] = [record.getMessage() for record in caplog.records]
    finally:
        logger.removeHandler(caplog.handler)
    untested = ["**** You are using ZeRO with an untested optimizer, proceed with caution *****", "another DeepSpeed warning"]
    assert said == {"adamw8bit": untested[1:], "lion8bit": untested[1:], "prodigy": untested[1:], "adamw": untested[1:], "sgd": untested[:1]}
