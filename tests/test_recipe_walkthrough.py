"""What a user walking through the shipped recipes and the command line ran into: settings another
section holds for the chosen method, messages that named the wrong key."""

import re
from pathlib import Path

import pytest

from finetune.config.recipe_loading import load_recipe
from finetune.errors import FinetuneError

RECIPES = Path(__file__).parent.parent / "recipes"
STAR_FOLDER = RECIPES.parent / "datasets" / "star"
STAR = [f"dreambooth.concepts.0.instance_dir={STAR_FOLDER}"]


def test_dreambooth_loraplus_for_a_frozen_text_encoder_names_dreambooths_switch():
    # lora.train_text_encoder, which it named, is refused with method dreambooth.
    with pytest.raises(FinetuneError, match=r"no text encoder trains: remove it \(or set dreambooth.train_text_encoder: true\)$"):
        load_recipe(RECIPES / "dreambooth_lora.yaml", STAR + ["lora.loraplus_lr_ratio=4", "lora.loraplus_text_encoder_lr_ratio=2"])
    load_recipe(RECIPES / "dreambooth_lora.yaml", STAR + ["lora.loraplus_text_encoder_lr_ratio=2", "dreambooth.train_text_encoder=true"])


@pytest.mark.parametrize(
    "recipe,overrides,message",
    [  # each trained with the text encoder frozen, or at the UNet's rate, without a word
        ("dreambooth.yaml", STAR + ["full.train_text_encoder=true"],
         r"full.train_text_encoder does nothing with method dreambooth \(its text encoder trains with dreambooth.train_text_encoder\): remove"),
        ("dreambooth_lora.yaml", STAR + ["dreambooth.train_text_encoder=true", "lora.text_encoder_lr=1e-5"],
         r"lora.text_encoder_lr does nothing with method dreambooth \(its text encoder trains with dreambooth.train_text_encoder\)"),
        ("lora.yaml", ["full.train_text_encoder=true"], r"full.train_text_encoder does nothing with method lora \(its text encoder trains with lora.train_text_encoder\)"),
        ("controlnet.yaml", ["lora.train_text_encoder=true"], r"lora.train_text_encoder does nothing with method controlnet \(it trains no text encoder\)"),
        ("dreambooth.yaml", STAR + ["dreambooth.text_encoder_lr=1e-6"],
         r"dreambooth.text_encoder_lr is the text encoder's rate, and it stays frozen: set dreambooth.train_text_encoder: true, or remove"),
        ("lora.yaml", ["lora.text_encoder_lr=1e-5"], r"lora.text_encoder_lr is the text encoder's rate, and it stays frozen"),
        ("pretrain_unet.yaml", ["full.train_text_encoder=false"], r"full.text_encoder_lr is the text encoder's rate, and it stays frozen"),
    ],
)  # fmt: skip
def test_text_encoder_settings_that_would_do_nothing_are_refused(recipe, overrides, message):
    with pytest.raises(FinetuneError, match=message):
        load_recipe(RECIPES / recipe, overrides)


def test_a_key_of_the_file_to_remove_is_said_as_its_null_override():
    """Turning the text encoder off on the command line of a recipe that sets its rate was told to "remove
    full.text_encoder_lr", a key of the file no override removes; `=null` does, and the line now says so."""
    with pytest.raises(FinetuneError, match=r"or remove full.text_encoder_lr \(full.text_encoder_lr=null on the command line\)$"):
        load_recipe(RECIPES / "pretrain_unet.yaml", ["full.train_text_encoder=false"])
    assert load_recipe(RECIPES / "pretrain_unet.yaml", ["full.train_text_encoder=false", "full.text_encoder_lr=null"]).full.text_encoder_lr is None
    with pytest.raises(FinetuneError, match=r"remove full.train_text_encoder$"):  # a key whose default is not null: as before
        load_recipe(RECIPES / "lora.yaml", ["full.train_text_encoder=true"])


def test_text_encoder_settings_of_the_methods_own_section_load():
    # Loading is the check (a refusal raises); what loaded is what was given.
    assert load_recipe(RECIPES / "dreambooth.yaml", STAR + ["dreambooth.train_text_encoder=true", "dreambooth.text_encoder_lr=1e-6"]).dreambooth.text_encoder_lr == 1e-6
    assert load_recipe(RECIPES / "lora.yaml", ["lora.train_text_encoder=true", "lora.text_encoder_lr=1e-5"]).lora.text_encoder_lr == 1e-5
    assert load_recipe(RECIPES / "pretrain_unet.yaml").method == "full"


def test_a_dreambooth_lora_started_from_a_file_with_text_encoder_layers_names_dreambooths_switch(make_recipe, tmp_path):
    import torch

    from finetune.formats.kohya import LoRA, LoRALayer, save_lora_file
    from finetune.methods.lora import LoRAMethod
    from finetune.models.loading import load_base_model

    layer = LoRALayer(down=torch.zeros(4, 32), up=torch.zeros(32, 4), alpha=4.0)
    source = save_lora_file(LoRA({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": layer}), tmp_path / "te.safetensors", "diffusers")
    concepts = [{"instance_dir": str(tmp_path), "instance_prompt": "a sks shape"}]
    recipe = make_recipe(method="dreambooth", data__image_dir=None, lora__init_from=str(source),
                         dreambooth={"concepts": concepts, "adapter": "lora", "prior_preservation": False})  # fmt: skip
    with pytest.raises(FinetuneError, match=r"has text-encoder layers: set dreambooth.train_text_encoder: true to start from them too$"):
        LoRAMethod(recipe).setup(load_base_model(recipe.model))  # as DreamBooth's adapter, with its text encoder frozen


def test_a_dreambooth_section_under_another_method_is_refused():
    # recipes/lora.yaml with concepts given on the command line trained a LoRA on its data.image_dir alone.
    with pytest.raises(FinetuneError, match=r"a dreambooth: section does nothing with method lora: set method: dreambooth to train its concepts, or remove the section$"):
        load_recipe(RECIPES / "lora.yaml", ["dreambooth={concepts: [{instance_dir: datasets/star, instance_prompt: a sks shape, class_prompt: a shape}]}"])


@pytest.mark.parametrize("class_prompt", ["1990", "[a dog, 2]", "{a: dog}", "yes"])
def test_a_class_prompt_of_another_type_names_its_key(class_prompt, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"method: dreambooth\ndreambooth:\n  concepts:\n    - {{instance_dir: a, instance_prompt: a sks dog, class_prompt: {class_prompt}}}\n")
    with pytest.raises(FinetuneError, match=r"key 'dreambooth.concepts.0.class_prompt': write a prompt or a list of prompts, quoted where YAML would read a number"):
        load_recipe(path)


def test_a_class_dir_that_is_a_file_is_one_line_before_the_model_loads(tmp_path, capsys):
    from finetune.cli.main import main

    recipe = RECIPES / "dreambooth_lora.yaml"
    overrides = STAR + [f"dreambooth.concepts.0.class_dir={STAR_FOLDER / '0000.png'}", f"output_dir={tmp_path / 'run'}", "data.resolution=64"]
    assert main(["check-data", str(recipe), *overrides]) == 2  # check-data plans the class images as training does
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: dreambooth.concepts.0.class_dir {STAR_FOLDER / '0000.png'} is a file, not a folder: name a folder for the class images (missing ones are generated there)")


@pytest.mark.parametrize("class_dir", [STAR_FOLDER, f"{STAR_FOLDER}/"])
def test_a_class_dir_that_is_an_instance_dir_is_refused(class_dir, tmp_path, capsys):
    from finetune.cli.main import main

    # It trained the subject's own photos as "a photo of a dog", and would have generated class images among them.
    overrides = STAR + [f"dreambooth.concepts.0.class_dir={class_dir}", f"output_dir={tmp_path / 'run'}", "data.resolution=64"]
    assert main(["check-data", str(RECIPES / "dreambooth_lora.yaml"), *overrides]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: dreambooth.concepts.0.class_dir {STAR_FOLDER} is dreambooth.concepts.0.instance_dir: give class images a folder of their own "
        f"(or class_dir: null for {tmp_path / 'run' / 'class_images' / 'concept-0'})")


def test_data_caption_under_dreambooth_is_refused():
    # Each concept's data is read with its instance_prompt as the caption: data.caption was silently replaced.
    with pytest.raises(FinetuneError, match=r"method dreambooth captions each concept's images with its instance_prompt \(or use_captions: true\); remove data.caption$"):
        load_recipe(RECIPES / "dreambooth.yaml", STAR + ["data.caption=a photo of sks dog"])


@pytest.mark.parametrize(
    "override,hint",
    [  # diffusers' DreamBooth script has these flat; 'dreambooth.class_prompt' was offered 'dreambooth.class_generation'
        ("dreambooth.class_prompt=a dog", "(each entry of 'dreambooth.concepts' has its own: 'dreambooth.concepts.0.class_prompt')"),
        ("dreambooth.instance_dir=photos", "(each entry of 'dreambooth.concepts' has its own: 'dreambooth.concepts.0.instance_dir')"),
        ("data.repeats=10", "(each entry of 'data.folders' has its own: 'data.folders.0.repeats')"),
    ],
)
def test_a_key_of_a_listed_section_given_to_its_parent_names_where_it_goes(override, hint):
    with pytest.raises(FinetuneError) as raised:
        load_recipe(RECIPES / "dreambooth.yaml", STAR + [override])
    assert str(raised.value).endswith(f"unknown key '{override.split('=')[0]}' {hint}"), raised.value


@pytest.mark.parametrize(
    "recipe,overrides,message",
    [
        ("dreambooth.yaml", STAR + ["controlnet.conditioning_scale=0.5"], r"controlnet.conditioning_scale does nothing with method dreambooth: remove it \(or use method controlnet\)$"),
        ("lora.yaml", ["vae.kl_weight=1e-4"], r"vae.kl_weight does nothing with method lora: remove it \(or use method vae\)$"),
    ],
)
def test_another_methods_section_is_refused(recipe, overrides, message):
    with pytest.raises(FinetuneError, match=message):
        load_recipe(RECIPES / recipe, overrides)
    load_recipe(RECIPES / recipe, [override for override in overrides if override.startswith("dreambooth")])  # with its defaults, it loads


@pytest.mark.parametrize(
    "recipe,overrides,message",
    [  # as lora.conv_rank already was: these shaped nothing, unsaid
        ("dreambooth_lora.yaml", STAR + ["dreambooth.adapter=full"], r"lora.rank shapes a LoRA, and method dreambooth trains none: remove it \(or use dreambooth.adapter: lora\)$"),
        ("lora.yaml", ["method=full", "lora.target_modules=[to_q, ff.net.2]"], r"lora.target_modules shapes a LoRA, and method full trains none: remove it \(or use method lora\)$"),
        ("controlnet.yaml", ["lora.use_rslora=true"], r"lora.use_rslora shapes a LoRA, and method controlnet trains none"),
    ],
)
def test_lora_settings_of_their_own_under_a_method_that_trains_no_lora_are_refused(recipe, overrides, message):
    with pytest.raises(FinetuneError, match=message):
        load_recipe(RECIPES / recipe, overrides)


def test_lora_settings_at_their_defaults_load_under_any_method():
    # Loading is the check (a refusal raises): recipes/lora.yaml names every lora key with its default.
    assert load_recipe(RECIPES / "lora.yaml", ["method=full"]).lora.changed() == []
    assert load_recipe(RECIPES / "dreambooth_lora.yaml", STAR + ["dreambooth.adapter=full", "lora.rank=16", "lora.alpha=16"]).dreambooth.adapter == "full"


@pytest.mark.parametrize("text,key", [("lora:\n  # rank: 8\n", "lora"), ("data:\n  image_dir: a\n  bucketing:\n", "data.bucketing")])
def test_a_section_whose_keys_are_all_commented_out_says_so(text, key, tmp_path):
    # It said "Input should be a valid dictionary or instance of LoRAConfig", or, for bucketing, to set enabled: true.
    path = tmp_path / "recipe.yaml"
    path.write_text("data: {image_dir: a}\n" + text if key == "lora" else text)
    with pytest.raises(FinetuneError) as raised:
        load_recipe(path)
    assert str(raised.value) == f"{path}: key '{key}': this section has no keys (all commented out?): give it keys, indented under it, or remove its line (got None)"


@pytest.mark.parametrize("override,key", [("model=sd15", "model"), ("dreambooth.concepts=[photos]", "dreambooth.concepts.0")])
def test_a_plain_value_for_a_section_says_it_is_a_section(override, key):
    # It said "Input should be a valid dictionary or instance of ModelConfig".
    with pytest.raises(FinetuneError) as raised:
        load_recipe(RECIPES / "dreambooth.yaml", STAR + [override])
    assert str(raised.value) == f"override '{override}': key '{key}': this is a section: write its keys, indented under it (got {override.split('=')[1].strip('[]')!r})"


def test_a_recipe_path_that_is_a_folder_or_not_text_says_so():
    with pytest.raises(FinetuneError, match=r"^recipe \S+recipes is a folder: pass the path of a YAML file in it, such as recipes/lora.yaml$"):
        load_recipe(RECIPES)  # it said "not found"
    with pytest.raises(FinetuneError, match=r"^recipe \S+0000.png is not a text file: pass the path of a YAML file such as recipes/lora.yaml$"):
        load_recipe(STAR_FOLDER / "0000.png")  # a UnicodeDecodeError traceback


def test_a_recipe_path_mistyped_or_left_out_says_what_was_meant():
    """`finetune train photos` (the images for the recipe), `finetune train data.image_dir=photos` (no recipe), recipes/lora.yml
    (the file is lora.yaml): each was 'not found' or 'a folder: pass the path of a YAML file in it'."""
    with pytest.raises(FinetuneError, match=rf"^recipe {re.escape(str(STAR_FOLDER))} is a folder of images: pass a recipe, and the folder as its data, "
                                            rf"e.g. recipes/lora.yaml data.image_dir={re.escape(str(STAR_FOLDER))}$"):  # fmt: skip
        load_recipe(STAR_FOLDER)
    with pytest.raises(FinetuneError, match=r"^recipe data.image_dir=photos not found: an override comes after the recipe, e.g. recipes/lora.yaml data.image_dir=photos$"):
        load_recipe("data.image_dir=photos")
    with pytest.raises(FinetuneError, match=rf"^recipe \S+lora.yml not found: did you mean {re.escape(str(RECIPES / 'lora.yaml'))}\?$"):
        load_recipe(RECIPES / "lora.yml")


def test_a_recipe_in_a_folder_named_with_an_equals_sign_is_said_as_a_path(tmp_path, monkeypatch):
    """A sweep's folder (runs/lr=1e-4/) holding the recipe: a mistyped name there was told 'an override comes after the
    recipe, e.g. recipes/lora.yaml runs/lr=1e-4/lora.yml', advice that fails as an override, and its near name went unsaid."""
    folder = tmp_path / "runs" / "lr=1e-4"
    folder.mkdir(parents=True)
    (folder / "lora.yaml").write_text("data: {image_dir: photos}\n")
    monkeypatch.chdir(tmp_path)
    for typed, folder_named in (("runs/lr=1e-4/lora.yml", "runs/lr=1e-4"), ("lr=1e-4/lora.yml", "lr=1e-4")):
        if typed.startswith("lr="):
            monkeypatch.chdir(tmp_path / "runs")
        with pytest.raises(FinetuneError, match=rf"^recipe {re.escape(typed)} not found: did you mean {re.escape(folder_named)}/lora.yaml\?$"):
            load_recipe(typed)


def test_a_key_given_twice_in_a_recipe_file_is_refused(tmp_path):
    # PyYAML keeps the last: the first train: section (max_steps 5) was dropped without a word.
    path = tmp_path / "recipe.yaml"
    path.write_text("data: {image_dir: a}\ntrain:\n  max_steps: 5\ntrain:\n  batch_size: 2\n")
    with pytest.raises(FinetuneError, match=r"is not valid YAML: key 'train' is given twice in one section \(again on line 4\): keep one$"):
        load_recipe(path)
    path.write_text("base: &base {lr: 1.0e-4}\noptimizer:\n  <<: *base\n  lr: 2.0e-4\ndata: {image_dir: a}\n")  # a merge's key overridden: fine
    with pytest.raises(FinetuneError, match=r"unknown key 'base'"):
        load_recipe(path)


def test_an_index_past_a_list_says_how_to_add_an_entry():
    with pytest.raises(FinetuneError, match=r"'1' is not an index of the list at 'dreambooth.concepts' in \S+dreambooth.yaml, which has 1: "
                                            r"to add an entry, give the whole list, e.g. dreambooth.concepts=\[\{\.\.\.\}, \{\.\.\.\}\]$"):  # fmt: skip
        load_recipe(RECIPES / "dreambooth.yaml", STAR + ["dreambooth.concepts.1.instance_dir=photos"])


def test_validation_loss_images_holding_out_a_whole_concept_is_refused(capsys):
    from finetune.cli.main import main

    # Held-out images are drawn among every concept's: 21 of 22 leave the striped concept none to train on (it said "ready to train").
    striped = RECIPES.parent / "datasets" / "striped"
    concepts = f"dreambooth.concepts=[{{instance_dir: {STAR_FOLDER}, instance_prompt: a sks shape}}, {{instance_dir: {striped}, use_captions: true}}]"
    base = f"model.pretrained={RECIPES.parent / 'finetune' / 'assets' / 'toyworld-base'}"  # its SD1.5 hub id is in no cache offline: a fatal problem
    overrides = [concepts, "dreambooth.prior_preservation=false", "data.resolution=64", base]
    assert main(["check-data", str(RECIPES / "dreambooth_lora.yaml"), *overrides, "validation.loss_images=21"]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"result: training would stop: validation.loss_images (21) holds out every image of dreambooth.concepts.1 ({striped}), which would never train: lower it")
    assert main(["check-data", str(RECIPES / "dreambooth_lora.yaml"), *overrides, "validation.loss_images=20"]) == 0


def test_concepts_sharing_a_class_folder_and_prompt_generate_its_images_once(tmp_path):
    from finetune.methods.dreambooth import DreamBoothMethod

    striped, classes = RECIPES.parent / "datasets" / "striped", tmp_path / "class"
    concepts = (f"dreambooth.concepts=[{{instance_dir: {STAR_FOLDER}, instance_prompt: a sks shape, class_prompt: a shape, class_dir: {classes}}}, "
                f"{{instance_dir: {striped}, use_captions: true, class_prompt: a shape, class_dir: {classes}}}]")  # fmt: skip
    method = DreamBoothMethod(load_recipe(RECIPES / "dreambooth_lora.yaml", [concepts, "dreambooth.num_class_images=3", "data.resolution=64"]))
    method.check_data()  # before the model loads: the plan of what to generate
    assert [plan.missing for plan in method.class_plans] == [[0, 1, 2], []]  # the second concept generated the same three again


def test_a_check_across_keys_failed_by_an_override_names_the_override():
    # lora.yaml warms up for 100 steps: it was "recipes/lora.yaml: optimizer.warmup_steps (100) must be below ...".
    with pytest.raises(FinetuneError, match=r"^override 'train.max_steps=12': optimizer.warmup_steps \(100\) must be below train.max_steps \(12\)"):
        load_recipe(RECIPES / "lora.yaml", ["train.max_steps=12"])
    with pytest.raises(FinetuneError, match=r"^override 'lora.conv_alpha=3': .*set conv_rank too"):
        load_recipe(RECIPES / "lora.yaml", ["lora.conv_alpha=3"])
    with pytest.raises(FinetuneError, match=r"^override 'train.max_steps=12': "):  # not the last override, which the message does not name
        load_recipe(RECIPES / "lora.yaml", ["train.max_steps=12", "seed=3"])


@pytest.mark.parametrize(
    "text,hint",
    [("image_dir: 2024", r'\(got 2024\); YAML reads it as a number: quote it \("2024"\)$'),
     ("image_dir: 2024-01-01", r'YAML reads it as a date: quote it \("2024-01-01"\)$'),
     ("{image_dir: x, caption: yes}", r"\(got True\); YAML reads an unquoted yes/no/on/off/true/false as a boolean: quote the text$")],
)  # fmt: skip
def test_a_number_where_text_is_expected_says_to_quote_it(tmp_path, text, hint):
    path = tmp_path / "r.yaml"
    path.write_text(f"data: {text}\n" if text.startswith("{") else f"data:\n  {text}\n")
    with pytest.raises(FinetuneError, match=hint):
        load_recipe(path)
