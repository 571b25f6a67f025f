import re
from pathlib import Path

import pytest

from finetune.config import Recipe
from finetune.config.recipe_keys import section_type
from finetune.config.recipe_loading import load_recipe, recipe_from_dict
from finetune.errors import FinetuneError

RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").rglob("*.yaml"))  # toyworld/ too
MINIMAL = {"data": {"image_dir": "images"}}


def test_every_method_is_a_choice_of_recipe_method():
    # Recipes load without torch, so Recipe.method lists the names finetune.methods.METHODS registers again: a method
    # added to one and not the other is either refused as a recipe or a KeyError once torch has loaded.
    from typing import get_args

    from finetune.methods import METHODS

    assert sorted(get_args(Recipe.model_fields["method"].annotation)) == sorted(METHODS)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.parent.name + "/" + p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.data.resolution % 8 == 0


def schema_keys(model, prefix="") -> list[str]:
    """Dotted names of every setting under a config class (nested sections included)."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        section = section_type(field.annotation)
        if section is not None:
            keys += schema_keys(section, f"{prefix}{name}.")
    return keys


def named_in(text: str, dotted: str) -> bool:
    """The key's last part appears as `key:` (set, or shown in a comment; a line or a {flow: map}) in the YAML text."""
    return re.search(rf"(^[ \t#-]*|[{{,] *){re.escape(dotted.split('.')[-1])}:", text, re.MULTILINE) is not None


# The reference recipes name every knob of their sections, so a user reads all options in one file;
# dreambooth.yaml documents its own section and points to lora.yaml for the shared ones.
REFERENCE_RECIPES = {
    "lora.yaml": ["model", "data", "lora", "train", "optimizer", "validation", "checkpoint", "logging"],
    "controlnet.yaml": ["model", "data", "controlnet", "train", "optimizer", "validation", "checkpoint", "logging"],
    "dreambooth.yaml": ["dreambooth"],
    "dreambooth_lora.yaml": ["dreambooth", "lora"],
    "pretrain_vae.yaml": ["vae"],  # the README sends users to these two for method vae's and full's own keys
    "pretrain_unet.yaml": ["full"],  # its adapter's keys: it lacked lora.max_norm, init_from, LoRA+ ...
}
# Keys a reference recipe's method refuses: naming them there would only mislead.
REFUSED_BY_METHOD = {"controlnet.yaml": ("data.loss_mask", "data.folders.loss_mask"),
                     "dreambooth_lora.yaml": ("lora.train_text_encoder", "lora.text_encoder_lr")}  # dreambooth's own


@pytest.mark.parametrize("name", list(REFERENCE_RECIPES))
def test_reference_recipes_name_every_key(name):
    text = (Path(__file__).parent.parent / "recipes" / name).read_text()
    missing = []
    for section in REFERENCE_RECIPES[name]:
        for key in schema_keys(section_type(Recipe.model_fields[section].annotation), f"{section}."):
            if not named_in(text, key) and not key.startswith(REFUSED_BY_METHOD.get(name, ())):
                missing.append(key)
    assert not missing, f"recipes/{name} does not name: {missing}"


def test_unknown_key_names_it_and_suggests_the_closest(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: {image_dir: x}\noptimizer:\n  lrr: 0.1\n")
    with pytest.raises(FinetuneError, match=r"unknown key 'optimizer.lrr' \(did you mean 'optimizer.lr'\?\)"):
        load_recipe(path)


def test_a_key_written_in_the_wrong_section_is_pointed_to_where_it_is(tmp_path):
    """train.lr (the optimizer's), optimizer.max_grad_norm (train's): the key is named in its own section, not a list of
    this section's keys; a name several sections have is given with each."""
    path = tmp_path / "r.yaml"
    path.write_text("data: {image_dir: x}\ntrain:\n  lr: 0.1\n")
    with pytest.raises(FinetuneError, match=r"unknown key 'train.lr' \(it belongs to another section: 'optimizer.lr'\)$"):
        load_recipe(path)
    with pytest.raises(FinetuneError, match=r"unknown key 'optimizer.max_grad_norm' \(it belongs to another section: 'train.max_grad_norm'\)$"):
        recipe_from_dict({**MINIMAL, "optimizer": {"max_grad_norm": 1.0}})
    with pytest.raises(FinetuneError) as raised:
        recipe_from_dict({**MINIMAL, "data": {**MINIMAL["data"], "every_n_steps": 10}})
    assert str(raised.value).endswith("(it belongs to another section: 'validation.every_n_steps', 'checkpoint.every_n_steps' or 'logging.every_n_steps')")


def test_enabled_in_a_section_without_that_switch_says_how_it_is_switched_not_that_it_belongs_to_data_bucketing():
    """data.loss_mask.enabled (as data.bucketing.enabled is written) was said to belong to data.bucketing."""
    with pytest.raises(FinetuneError) as raised:
        recipe_from_dict({**MINIMAL, "data": {**MINIMAL["data"], "loss_mask": {"enabled": True}}})
    assert str(raised.value).endswith("unknown key 'data.loss_mask.enabled' (data.loss_mask has no switch: masks are on where "
                                      "data.loss_mask.source is alpha or files, off where it is none)")  # fmt: skip
    with pytest.raises(FinetuneError) as raised:  # a section with no such word for it: its keys
        recipe_from_dict({**MINIMAL, "validation": {"enabled": False}})
    assert "unknown key 'validation.enabled' (valid keys: prompts, " in str(raised.value) and "bucketing" not in str(raised.value)


def test_unknown_top_level_section():
    with pytest.raises(FinetuneError, match=r"unknown key 'optimzer' \(did you mean 'optimizer'\?\)"):
        recipe_from_dict({**MINIMAL, "optimzer": {}})


def test_wrong_type_names_key_and_type():
    with pytest.raises(FinetuneError, match=r"key 'train.max_steps': Input should be a valid integer"):
        recipe_from_dict({**MINIMAL, "train": {"max_steps": "many"}})


def test_resolution_must_be_multiple_of_8():
    with pytest.raises(FinetuneError, match=r"key 'data.resolution': must be a positive multiple of 8"):
        recipe_from_dict({"data": {"image_dir": "x", "resolution": 500}})


def test_overrides_use_dotted_paths_and_yaml_values(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: {image_dir: x}\n")
    recipe = load_recipe(path, ["optimizer.lr=5e-5", "lora.target_modules=[to_q, to_v]", "train.snr_gamma=null", "data.resolution=256"])
    assert recipe.optimizer.lr == 5e-5
    assert recipe.lora.target_modules == ["to_q", "to_v"]
    assert recipe.train.snr_gamma is None
    assert recipe.data.resolution == 256


def test_override_without_equals_is_an_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: {image_dir: x}\n")
    with pytest.raises(FinetuneError, match=r"^override 'optimizer.lr' must look like key=value, e.g. optimizer.lr=1e-4$"):  # names the one given
        load_recipe(path, ["optimizer.lr"])


def test_missing_recipe_file():
    with pytest.raises(FinetuneError, match="recipe nope.yaml not found"):
        load_recipe("nope.yaml")


def test_data_needs_exactly_one_source():
    with pytest.raises(FinetuneError, match=r"data.image_dir \(a\) and data.dataset \(b\) are both set: keep one"):
        recipe_from_dict({"data": {"image_dir": "a", "dataset": "b"}})
    with pytest.raises(FinetuneError, match="set exactly one of data.image_dir"):
        recipe_from_dict({"data": {}})


def test_fingerprint_changes_with_any_setting():
    a = recipe_from_dict(MINIMAL)
    b = recipe_from_dict({**MINIMAL, "optimizer": {"lr": 2e-4}})
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == recipe_from_dict(MINIMAL).fingerprint()


def test_override_indexes_lists():
    from finetune.config.recipe_loading import apply_override

    raw = {"dreambooth": {"concepts": [{"instance_dir": "a"}, {"instance_dir": "b"}]}}
    apply_override(raw, "dreambooth.concepts.1.instance_dir=photos")
    assert raw["dreambooth"]["concepts"][1]["instance_dir"] == "photos"
    apply_override(raw, "dreambooth.concepts[0].instance_dir=mine")  # the bracket spelling means the same
    assert [c["instance_dir"] for c in raw["dreambooth"]["concepts"]] == ["mine", "photos"]
    with pytest.raises(FinetuneError, match="'5' is not an index"):
        apply_override(raw, "dreambooth.concepts.5.instance_dir=x")
    with pytest.raises(FinetuneError, match=r"has no list at 'dreambooth.concepts' to index; give the whole list instead, e.g. dreambooth.concepts=\[\{\.\.\.\}\]"):
        apply_override({"method": "lora"}, "dreambooth.concepts.0.instance_dir=x")  # a LoRA recipe has no concepts


@pytest.mark.parametrize(
    "override,message",
    [
        ("lora.rank=0", r"^key 'lora.rank': Input should be greater than or equal to 1 \(got 0\)$"),
        ("lora.alpha=0", r"^key 'lora.alpha': Input should be greater than 0 \(got 0\)$"),
        ("lora.dropout=2", r"^key 'lora.dropout': Input should be less than 1 \(got 2\)$"),
        ("lora.target_modules=[]", r"^key 'lora.target_modules': List should have at least 1 item"),
        ("train.max_steps=0", r"^key 'train.max_steps': Input should be greater than or equal to 1 \(got 0\)$"),
        ("optimizer.warmup_steps=50", r"optimizer.warmup_steps \(50\) must be below train.max_steps \(10\): the learning rate would never reach"),
        ("data.caption_dropout=1.5", r"^key 'data.caption_dropout': must be between 0 and 1 \(got 1.5\)$"),
        ("data.folders=[{path: a, repeats: 0}]", r"^key 'data.folders.0.repeats': must be at least 1"),
        ("train={max_steps: 10, min_timestep: 600, max_timestep: 500}", r"^key 'train': train.min_timestep \(600\) must be below train.max_timestep \(500\)"),
        ("optimizer.name=prodigy", r"^key 'optimizer': optimizer.lr with prodigy multiplies the step size it finds: set it near 1.0 \(got 0.0001\)"),
        ("data.folders=[{path: a}, {path: ./a/}]", r"^key 'data': data.folders lists 'a' twice with the same template: list it once and raise its repeats"),
        ("data.folders=[{path: a, template: '{caption}'}, {path: ../images/a}]", r"^key 'data': data.folders lists 'a' twice with the same template"),
        ("data.keep_tokens=2", r"^key 'data': data.keep_tokens keeps the first tags in place while data.shuffle_tags shuffles or data.tag_dropout drops the others: "
                               r"set data.shuffle_tags: true \(or data.tag_dropout\)$"),
        # Each of these crashed mid-run (the validation ones after training, before the adapter was saved).
        ("validation.num_inference_steps=0", r"^key 'validation.num_inference_steps': Input should be greater than or equal to 1 \(got 0\)$"),
        ("validation.images_per_prompt=0", r"^key 'validation.images_per_prompt': Input should be greater than or equal to 1"),
        ("logging.every_n_steps=0", r"^key 'logging.every_n_steps': Input should be greater than or equal to 1"),
        ("checkpoint.keep_last=-1", r"^key 'checkpoint.keep_last': Input should be greater than or equal to 0"),
        ("data.folders=[{path: a, template: 'sks, {captions}'}]", r"^key 'data.folders.0.template': \{captions\} is not a placeholder: the template's one placeholder is \{caption\}"),
        ("dreambooth={concepts: [{instance_dir: a}]}", r"^key 'dreambooth.concepts.0': set instance_prompt \(e.g. 'a photo of sks dog'\), or use_captions: true"),
        ("train.cache_dir=/tmp/cache", r"^key 'train': train.cache_dir keeps cached encodings, but nothing is cached: set train.cache_latents"),
        ("optimizer={scheduler: constant, warmup_steps: 5}", r"^key 'optimizer': optimizer.warmup_steps \(5\) does nothing with scheduler constant: use constant_with_warmup"),
        ("data.bucketing={enabled: true, min_side: 0}", r"^key 'data': data.bucketing.min_side \(0\) must be at least data.bucketing.step \(64\)$"),
        # Each of these reached torch after the model loaded (a traceback), or trained silently backwards.
        ("optimizer.lr=-1", r"^key 'optimizer.lr': Input should be greater than 0 \(got -1\)$"),
        ("optimizer.weight_decay=-0.1", r"^key 'optimizer.weight_decay': Input should be greater than or equal to 0 \(got -0.1\)$"),
        ("optimizer.betas=[0.9, 1.5]", r"^key 'optimizer.betas': each beta must be at least 0 and below 1 \(the moments' decay\)"),
        ("train.max_grad_norm=-1", r"^key 'train.max_grad_norm': Input should be greater than or equal to 0 \(got -1\)$"),
        ("lora.text_encoder_lr=0", r"^key 'lora.text_encoder_lr': Input should be greater than 0 \(got 0\)$"),
        ("seed=-1", r"^key 'seed': Input should be greater than or equal to 0 \(got -1\)$"),  # numpy's seeding raised once the model had loaded
        ("seed=4294967296", r"^key 'seed': Input should be less than or equal to 4294967295"),
        # Values that would do nothing (their defaults, as the reference recipes name them, are fine).
        ("train.huber_c=0.2", r"^key 'train': train.huber_c \(0.2\) is the pseudo-Huber loss's threshold: set train.loss: huber, or remove huber_c$"),
        ("train.multires_noise_discount=0.5", r"^key 'train': train.multires_noise_discount weighs multi-resolution noise, which is off: set train.multires_noise_iterations"),
    ],
)
def test_values_that_cannot_train_are_one_line_errors_naming_the_key(override, message, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("data: {image_dir: images}\ntrain: {max_steps: 10}\noptimizer: {scheduler: cosine}\n")
    with pytest.raises(FinetuneError) as raised:
        load_recipe(path, [override])
    text = str(raised.value)  # a key's value set by the override names the override; a clash of keys, the file
    prefix = f"override '{override}': " if text.startswith("override") else f"{path}: "
    assert text.startswith(prefix) and re.search(message, text.removeprefix(prefix)), text


def test_override_values_for_text_keys_are_taken_as_typed(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: {image_dir: x}\ntrain: {mixed_precision: no}\n")  # YAML reads this `no` as false
    assert load_recipe(path).train.mixed_precision == "no"
    recipe = load_recipe(path, [
        "data.caption=a photo of sks dog #1 best",  # YAML would drop the "comment"
        "data.image_dir=2024-01-01", "output_dir=[draft] run",  # YAML: a date; a parse error
        "train.mixed_precision=no", "validation.prompts=[a, b]", "lora.rank=8", "train.snr_gamma=null",
    ])  # fmt: skip
    assert recipe.data.caption == "a photo of sks dog #1 best" and recipe.data.image_dir == "2024-01-01"
    assert recipe.output_dir == "[draft] run" and recipe.train.mixed_precision == "no"
    assert recipe.validation.prompts == ["a", "b"] and recipe.lora.rank == 8 and recipe.train.snr_gamma is None
    with pytest.raises(FinetuneError, match=r"^override 'train.max_steps=\[1': the value is not valid YAML .*: quote it$"):
        load_recipe(path, ["train.max_steps=[1"])


def test_a_concept_reading_captions_needs_no_instance_prompt():
    concept = {"instance_dir": "photos", "use_captions": True, "class_prompt": "a photo of a dog"}
    recipe = recipe_from_dict({"method": "dreambooth", "dreambooth": {"concepts": [concept]}})
    assert recipe.dreambooth.concepts[0].instance_prompt is None


def test_prodigy_takes_one_learning_rate_for_every_parameter(tmp_path):
    """Prodigy refuses parameter groups with their own rates at its first step: said on load instead."""
    path = tmp_path / "recipe.yaml"
    path.write_text("data: {image_dir: images}\noptimizer: {name: prodigy, lr: 1.0}\n")
    with pytest.raises(FinetuneError, match=r"override .lora.text_encoder_lr=5e-5.: lora.text_encoder_lr with prodigy: it takes one optimizer.lr for every parameter; remove lora.text_encoder_lr"):
        load_recipe(path, ["lora.train_text_encoder=true", "lora.text_encoder_lr=5e-5"])
    assert load_recipe(path, ["lora.train_text_encoder=true"]).optimizer.name == "prodigy"


def test_other_trainers_names_and_command_line_mistakes_point_to_the_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: {image_dir: x}\n")
    cases = {
        "train.learning_rate=1e-4": "override 'train.learning_rate=1e-4': unknown key 'train.learning_rate' (here it is 'optimizer.lr')",
        "lora.network_dim=8": "override 'lora.network_dim=8': unknown key 'lora.network_dim' (here it is 'lora.rank')",
        "validation.prompts=a cat": "override 'validation.prompts=a cat': key 'validation.prompts': Input should be a valid list (got 'a cat'); "
                                    "a list is written in brackets: prompts: [\"first\", \"second\"] in a recipe, validation.prompts='[\"first\", \"second\"]' on the command line",
    }  # fmt: skip
    for override, message in cases.items():
        with pytest.raises(FinetuneError) as raised:
            load_recipe(path, [override])
        assert str(raised.value) == message
    path.write_text("data: {image_dir: x}\ntrain: {max_train_steps: 100}\n")  # in the file, the file is named
    with pytest.raises(FinetuneError, match=rf"^{re.escape(str(path))}: unknown key 'train.max_train_steps' \(here it is 'train.max_steps'\)$"):
        load_recipe(path)


def test_the_vae_method_refuses_settings_of_the_denoising_loss_it_does_not_have(make_recipe):
    """method vae took train.cache_latents, snr_gamma and validation.prompts and ignored them without a word."""
    for overrides, named in (({"train__cache_latents": True}, "train.cache_latents"), ({"train__snr_gamma": 5.0}, "train.snr_gamma"),
                             ({"validation__prompts": ["a red circle"]}, "validation.prompts")):  # fmt: skip
        with pytest.raises(FinetuneError, match=rf"method vae trains the autoencoder on reconstructions, so {re.escape(named)} would do nothing: remove it$"):
            make_recipe(method="vae", **overrides)
    make_recipe(method="vae", train__max_grad_norm=0.5)  # what it does use


def test_a_seed_the_random_generators_cannot_take_is_refused_where_it_is_given(capsys):
    """torch's generators take at most 64 bits and numpy's no negative seed: `sample --seed 2**64` was an
    overflow traceback. Sampling seeds take 0 to 2**63 - 1, in recipes and on the command line (the run's
    own seed, which numpy takes through accelerate's set_seed, 0 to 2**32 - 1)."""
    from finetune.cli.main import main

    for value, bound in ((2**63, "less than or equal to 9223372036854775807"), (-1, "greater than or equal to 0")):
        with pytest.raises(FinetuneError, match=rf"validation.seed.*{bound}"):
            recipe_from_dict({**MINIMAL, "validation": {"seed": value}})
    assert recipe_from_dict({**MINIMAL, "validation": {"seed": 2**63 - 1}}).validation.seed == 2**63 - 1
    for command in (["sample", "--prompt", "x"], ["eval"]):
        for value in (str(2**64), "-1"):
            with pytest.raises(SystemExit):
                main([*command, "--seed", value])
            assert f"error: argument --seed: must be from 0 to 2**63 - 1, got {value}" in capsys.readouterr().err


@pytest.mark.parametrize("override", ["optimizer.lr=.inf", "lora.alpha=.nan", "train.noise_offset=.inf", "train.max_grad_norm=.inf"])
def test_inf_and_nan_settings_are_refused(tmp_path, override):
    """YAML reads .inf and .nan as floats: an infinite learning rate or alpha trained NaNs without a word."""
    path = tmp_path / "recipe.yaml"
    path.write_text("data:\n  image_dir: images\n")
    with pytest.raises(FinetuneError, match=rf"{re.escape(override.split('=')[0])}.*finite number"):
        load_recipe(path, [override])


@pytest.mark.parametrize(
    "override,said",
    [  # a list index in brackets, as apply_override reads it, is the override's too (the error named the file)
        ("dreambooth.concepts[0].repeats=0", "key 'dreambooth.concepts.0.repeats': Input should be greater than or equal to 1"),
        ("validation.prompts[0]=a dog --zz 3", "key 'validation.prompts': 'a dog --zz 3': unknown option --zz"),
    ],
)
def test_an_override_with_a_bracketed_index_is_named_by_its_error(override, said):
    with pytest.raises(FinetuneError) as raised:
        listed = ["validation.prompts=[a photo of a dog]"]  # the recipe leaves them null: a list to index
        load_recipe(Path(__file__).parent.parent / "recipes" / "dreambooth.yaml", listed + [override])
    assert str(raised.value).startswith(f"override '{override}': {said}"), raised.value


def test_an_override_gives_keys_to_a_section_whose_keys_are_all_commented_out(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("data: {image_dir: images}\nlora:\n  # rank: 8\n")  # `lora:` is null: it was "'lora' is not a section"
    assert load_recipe(path, ["lora.rank=8"]).lora.rank == 8


def test_the_example_of_a_whole_list_writes_its_entries_as_they_are(tmp_path):
    # A list of prompts or numbers was shown as one of sections, validation.prompts=[{...}, {...}].
    path = tmp_path / "recipe.yaml"
    path.write_text("data: {image_dir: images}\nvalidation: {prompts: [a cat]}\n")
    with pytest.raises(FinetuneError, match=r"to add an entry, give the whole list, e.g. validation.prompts=\[\.\.\., \.\.\.\]$"):
        load_recipe(path, ["validation.prompts.1=a dog"])
    with pytest.raises(FinetuneError, match=r"give the whole list instead, e.g. optimizer.betas=\[\.\.\.\]$"):
        load_recipe(path, ["optimizer.betas.0=0.8"])


def test_a_list_written_as_text_in_a_recipe_is_shown_the_recipes_syntax(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("data: {image_dir: x}\nvalidation:\n  prompts: a cat\n")  # was shown the command line's validation.prompts='[...]' alone
    with pytest.raises(FinetuneError, match=r"a list is written in brackets: prompts: \[\"first\", \"second\"\] in a recipe, "):
        load_recipe(path)


@pytest.mark.parametrize("given,said", [
    ({"use_ema": True}, "unknown key 'use_ema' (here it is 'train.ema_decay: 0.999')"),  # was "did you mean 'seed'?"
    ({"train": {"ip_noise_gamma": 0.1}}, "unknown key 'train.ip_noise_gamma' (here it is 'train.input_perturbation')"),
    ({"debiased_estimation_loss": True}, "unknown key 'debiased_estimation_loss' (here it is 'train.debiased_estimation')"),
    ({"lora": {"conv_dim": 8}}, "unknown key 'lora.conv_dim' (here it is 'lora.conv_rank')"),
    ({"checkpoints_total_limit": 3}, "unknown key 'checkpoints_total_limit' (here it is 'checkpoint.keep_last')"),
    ({"sample_every_n_steps": 100}, "unknown key 'sample_every_n_steps' (here it is 'validation.every_n_steps')"),
    ({"reg_data_dir": "reg"}, "unknown key 'reg_data_dir' (here it is 'dreambooth.concepts.0.class_dir')"),
    ({"v2": True}, "unknown key 'v2' (none is needed here: an SD2.x base is known from its configs (model.pretrained))"),
])  # fmt: skip
def test_sd_scripts_diffusers_and_simpletuner_names_of_the_objective_lora_and_checkpoints_point_to_the_key(given, said):
    """A power user's habits, which met the section's whole list of keys or a wrong guess (use_ema: 'seed')."""
    with pytest.raises(FinetuneError) as raised:
        recipe_from_dict({**MINIMAL, **given})
    assert str(raised.value) == f"recipe: {said}"


@pytest.mark.parametrize("section,key,given,written", [
    ("optimizer", "name", "AdamW8bit", "adamw8bit"), ("optimizer", "name", "PagedAdamW8bit", "paged_adamw8bit"),  # sd-scripts' optimizer_type
    ("optimizer", "scheduler", "Cosine", "cosine"), ("model", "prediction_type", "V_Prediction", "v_prediction"),
    ("train", "loss", "l2", "mse"),  # sd-scripts' loss_type
])  # fmt: skip
def test_a_choice_spelled_as_another_trainer_spells_it_is_named_as_written_here(section, key, given, written):
    with pytest.raises(FinetuneError) as raised:
        recipe_from_dict({**MINIMAL, section: {key: given}})
    assert str(raised.value).endswith(f"(got {given!r}); here it is written '{written}'"), raised.value


def test_a_choice_no_spelling_means_gets_no_suggestion():
    with pytest.raises(FinetuneError) as raised:  # sd-scripts' smooth_l1 is no loss here: nothing is offered for it
        recipe_from_dict({**MINIMAL, "train": {"loss": "smooth_l1"}})
    assert str(raised.value).endswith("(got 'smooth_l1')"), raised.value


def test_an_optimizer_given_as_the_section_s_value_names_optimizer_name_and_its_choices():
    """SimpleTuner's optimizer: adamw_bf16 was "this is a section: write its keys"."""
    import typing

    from finetune.config import OptimizerConfig

    with pytest.raises(FinetuneError) as raised:
        recipe_from_dict({**MINIMAL, "optimizer": "adamw_bf16"})
    choices = typing.get_args(OptimizerConfig.model_fields["name"].annotation)
    assert str(raised.value).startswith(f"recipe: key 'optimizer': optimizer is a section, not 'adamw_bf16': name the optimizer with optimizer.name "
                                        f"({', '.join(choices[:-1])} or {choices[-1]})")  # fmt: skip
