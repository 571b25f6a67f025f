"""What a new user meets running the README's and docs' commands as written."""

from __future__ import annotations

from pathlib import Path

from finetune.evaluation.evaluate import print_table


def test_eval_table_names_the_models_scored_in_whole_paths(capsys):
    # The title was the rich table's, wrapped to the width of a three-column table: the paths of the base
    # and the LoRA came out split mid-word, neither readable nor copyable.
    result = {
        "settings": {"base": "finetune/assets/toyworld-base", "lora": "outputs/quickstart"},
        "metrics": {"style_share": 0.25},
        "n": {"style_share": 4},
    }
    print_table(result)
    out = capsys.readouterr().out
    assert "eval of finetune/assets/toyworld-base + outputs/quickstart" in out
    assert "style_share" in out and "0.250" in out


def test_demo_calls_only_dreambooth_pipelines_dreambooth_pipelines():
    # Every folder with a model_index.json was listed as a "DreamBooth pipeline": a full fine-tune, a VAE
    # pretraining run and a `finetune merge` output too, beside a method column saying otherwise.
    from types import SimpleNamespace

    from finetune.demo.page import table_row

    def kind(method: str) -> str:
        metadata = {"finetune.method": method, "finetune.base_model": "finetune/assets/toyworld-base", "finetune.steps": "6"}
        return table_row(SimpleNamespace(name="run", kind="pipeline", layout=None, metadata=metadata, refused=None))[1]

    assert kind("dreambooth") == "DreamBooth pipeline"
    assert kind("full") == kind("vae") == kind("lora merged at 0.8") == "pipeline"


def test_init_from_says_which_of_the_recipes_layers_the_lora_has_nothing_for(make_recipe, tmp_path):
    # docs/methods.md: lora.init_from needs "same rank and target layers, or one line saying which differs". A file of
    # fewer layers than the recipe's targets (the quickstart's ff and conv layers on an attention-only LoRA)
    # started without a word, its extra layers fresh, the start line counting only the file's layers.
    from finetune.methods.lora import LoRAMethod
    from finetune.models.loading import load_base_model
    from finetune.training.trainer import train

    first = train(make_recipe(output_dir=str(tmp_path / "first"), train__max_steps=1))

    def start_lines(**overrides) -> list[str]:
        recipe = make_recipe(lora__init_from=str(first.output_dir), **overrides)
        method = LoRAMethod(recipe)
        method.setup(load_base_model(recipe.model))
        return method.start_lines

    assert not [line for line in start_lines() if line.startswith("warning:")]
    warnings = [line for line in start_lines(lora__target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"]) if line.startswith("warning:")]
    assert len(warnings) == 1 and f"lora.init_from {first.output_dir} has no weights for" in warnings[0], warnings
    assert "(proj_in; e.g. unet." in warnings[0] and warnings[0].endswith("they start fresh, as in a new LoRA")


def test_eval_reports_of_other_subject_prompts_do_not_replace_each_other(tiny_model, tmp_path, monkeypatch):
    # docs/toyworld.md scores the base on "a star ..." (--identifier "" --class-word star) beside "a sks shape
    # ..." (the defaults): both went to eval-subject.json, the second replacing the first without a word.
    import json

    from finetune.cli.main import main

    monkeypatch.chdir(tmp_path)
    common = ["eval", "--base", str(tiny_model), "--suite", "subject", "--num-prompts", "1", "--steps", "1"]
    assert main(common) == 0
    assert main([*common, "--identifier", "", "--class-word", "star"]) == 0
    reports = tmp_path / "outputs" / "eval" / tiny_model.name
    assert json.loads((reports / "eval-subject.json").read_text())["settings"]["class_word"] == "shape"
    assert json.loads((reports / "eval-subject-id-none-class-star.json").read_text())["settings"]["class_word"] == "star"


def test_check_data_says_what_an_empty_class_folder_will_need(tiny_model, image_folder, tmp_path, capsys):
    # A class folder holding some images said "(N more to generate)"; one holding none said nothing at all,
    # so check-data before a DreamBooth run hid the generation that training starts with.
    import yaml

    from finetune.cli.main import main

    recipe = tmp_path / "dreambooth.yaml"
    recipe.write_text(yaml.safe_dump({
        "method": "dreambooth", "output_dir": str(tmp_path / "run"), "model": {"pretrained": str(tiny_model)},
        "data": {"resolution": 64},
        "dreambooth": {"concepts": [{"instance_dir": str(image_folder), "instance_prompt": "a sks shape", "class_prompt": "a shape"}],
                       "num_class_images": 3},
    }))  # fmt: skip
    assert main(["check-data", str(recipe)]) == 0
    folder = tmp_path / "run" / "class_images" / "concept-0"
    assert f"class images {folder}: none yet, 3 to generate (training makes them first, with the base model)" in capsys.readouterr().out


def test_an_eval_report_records_the_training_steps_it_scored(make_recipe, tmp_path, capsys):
    # The report goes into the run's folder, where it stays when the run trains on (--resume latest): nothing
    # in it said which weights it scored, so it read as the newer adapter's score.
    import json

    from finetune.cli.main import main
    from finetune.training.trainer import train

    run = train(make_recipe(output_dir=str(tmp_path / "run"), train__max_steps=2))
    capsys.readouterr()
    assert main(["eval", "--lora", str(run.output_dir), "--suite", "style", "--num-prompts", "1", "--steps", "1"]) == 0
    assert f"+ {run.output_dir} (trained 2 steps)" in capsys.readouterr().out
    assert json.loads((run.output_dir / "eval-style.json").read_text())["settings"]["adapter_steps"] == "2"


# The README's and docs' commands and keys, as a user copies them (finetune/cli/arguments.py, the recipe schema).
ROOT = Path(__file__).resolve().parent.parent
# Found from the repository, not the current folder: run from elsewhere, Path("docs").glob found none and only README.md was checked.
DOCS = [Path("README.md"), *sorted(path.relative_to(ROOT) for path in (ROOT / "docs").glob("*.md"))]


def code_blocks(path: Path, languages: set[str]) -> list[str]:
    blocks, lines, language = [], None, ""
    for line in (ROOT / path).read_text().splitlines():
        if line.strip().startswith("```"):
            if lines is None:
                lines, language = [], line.strip()[3:]
            else:
                if language in languages:
                    blocks.append("\n".join(lines))
                lines = None
        elif lines is not None:
            lines.append(line)
    return blocks


def finetune_commands() -> list[tuple[Path, list[str]]]:
    """(doc, argv after `finetune`) for each command of the docs' shell blocks, run directly, after environment
    settings, or as `-m finetune` under accelerate; optional parts in brackets included ([--lora FILE], [seed=1]),
    but for a placeholder of a word ([overrides])."""
    import re
    import shlex

    commands = []
    for path in DOCS:
        for block in code_blocks(path, {"bash", "sh", ""}):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\[([^\]]*)\]", lambda m: m[1] if m[1].startswith("-") or "=" in m[1] else "", line)
                words = shlex.split(line, comments=True)
                starts = [i + 1 for i, word in enumerate(words) if word == "finetune" and (i == 0 or words[i - 1] == "-m" or "=" in words[i - 1])]
                commands += [(path, words[start:]) for start in starts[:1]]
    return commands


def test_every_command_is_in_the_readme():
    # make-tiny-model, make-sample-data, make-world-data and export-base were in --help alone.
    from finetune.cli.arguments import build_parser

    readme = (ROOT / "README.md").read_text()
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert [command for command in commands if f"finetune {command} " not in readme] == []


def test_the_docs_commands_parse_and_their_recipes_load(monkeypatch):
    # Each flag, recipe and `key=value` of a documented command exists: a renamed option or key fails here, not
    # for the user who copies the line.
    from finetune.cli.arguments import parse_arguments
    from finetune.config.recipe_loading import load_recipe

    monkeypatch.chdir(ROOT)
    commands = finetune_commands()
    assert len(commands) > 30 and {argv[0] for _, argv in commands} >= {"train", "sample", "eval", "export", "merge", "bench", "demo"}
    for path, argv in commands:
        try:
            args = parse_arguments(argv)
        except SystemExit:
            raise AssertionError(f"{path}: finetune {' '.join(argv)} does not parse") from None
        if args.command in ("train", "check-data") and args.recipe and Path(args.recipe).is_file():
            load_recipe(args.recipe, args.overrides)


def test_the_recipe_keys_the_docs_name_exist():
    # README's DreamBooth section named `class_generation.batch_size`, which as an override or recipe key is
    # unknown: it is dreambooth.class_generation.batch_size. (Keys from a top-level section, such as
    # `lora.rank`, are test_walkthrough_recipes.py's; here those from a nested one, and the YAML recipe blocks.)
    import re

    import yaml

    from finetune.config.recipe import Recipe
    from finetune.config.recipe_keys import section_type
    from finetune.config.recipe_loading import _annotation_at

    def nested_section_names(model) -> set[str]:
        names = set()
        for field in model.model_fields.values():
            if (section := section_type(field.annotation)) is not None:
                names |= {name for name, inner in section.model_fields.items() if section_type(inner.annotation)}
                names |= nested_section_names(section)
        return names

    def key_paths(node, prefix=()):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for key, value in items:
            if isinstance(node, dict):
                yield (*prefix, str(key))
            yield from key_paths(value, (*prefix, str(key)))

    sections = nested_section_names(Recipe)
    unknown = []
    for path in DOCS:
        for span in re.findall(r"`([^`\n]+)`", (ROOT / path).read_text()):
            for key in re.findall(r"(?<![\w./-])([a-z_]+(?:\.(?:[a-z_][a-z0-9_]*|\d+))+)(?![\w/*-]|\.[a-z*])", span):
                if key.split(".")[0] in sections and not key.endswith(".py"):  # `folders.py`: a module, not a key
                    unknown.append(f"{path}: {key}")
        for block in code_blocks(path, {"yaml"}):
            first = next(line for line in block.splitlines() if line.strip() and not line.startswith("#"))
            if first.startswith("["):  # docs/results.md's prompt lists, not a recipe
                continue
            recipe = yaml.safe_load(block)
            if isinstance(recipe, dict):
                unknown += [f"{path}: {'.'.join(keys)}" for keys in key_paths(recipe) if _annotation_at(list(keys)) is None]
    assert unknown == []


def test_the_make_targets_the_readme_names_exist():
    import re

    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))
    named = set(re.findall(r"`make ([a-z][\w-]*)", (ROOT / "README.md").read_text()))
    assert named and named <= targets, named - targets


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but hyphens and underscores dropped, spaces as hyphens."""
    import re

    return re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    import re

    text = re.sub(r"^```.*?^```", "", (ROOT / path).read_text(), flags=re.M | re.S)  # a "# comment" in a block is no heading
    named, seen = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.M):
        anchor = github_anchor(heading)
        named.add(f"{anchor}-{seen[anchor]}" if anchor in seen else anchor)  # GitHub numbers a repeated heading's anchor
        seen[anchor] = seen.get(anchor, 0) + 1
    return named


def test_every_relative_link_and_anchor_of_the_docs_resolves():
    # The docs link each other by section ([Recipe keys](#recipe-keys), docs/training.md#outputs): a heading
    # renamed or a page moved leaves a link that opens the page's top, or GitHub's 404, without a word.
    import re

    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", (ROOT / path).read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file) if file else path
            if not (ROOT / linked).exists():
                broken.append(f"{path}: {target} (no {linked.as_posix()})")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{path}: {target} (no heading of that anchor in {linked.as_posix()})")
    assert broken == []


def test_every_shipped_file_the_docs_name_exists():
    # `recipes/...`, `configs/deepspeed/...`, `finetune/...` and the like in backticks are files of this repository
    # that a reader opens or passes to a command; outputs/ and the user's own folders are not.
    import re

    # So are the tests README's "What is tested in which mode" names (`test_distributed`: tests/test_distributed.py), or a
    # test function (docs/results.md).
    shipped = ("recipes/", "configs/", "docs/", "finetune/", "tests/", "datasets/", "demo/", ".ci/")
    test_functions = {name for file in (ROOT / "tests").glob("*.py") for name in re.findall(r"^def (test_\w+)", file.read_text(), re.M)}
    missing = []
    for path in DOCS:
        for span in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", (ROOT / path).read_text(), flags=re.S)):
            for name in re.findall(r"(?<![\w./-])((?:\.ci|[a-z]+)/[\w./-]*\w/?)", span):
                if name.startswith(shipped) and not (ROOT / name).exists():
                    missing.append(f"{path}: {name}")
            if re.fullmatch(r"test_\w+", span) and not (ROOT / "tests" / f"{span}.py").is_file() and span not in test_functions:
                missing.append(f"{path}: {span}")
            if re.fullmatch(r"test_\w+\.py", span) and not (ROOT / "tests" / span).is_file():  # README's "`test_mps.py`"
                missing.append(f"{path}: {span}")
    assert missing == []


def test_the_options_of_commands_named_in_the_docs_prose_exist():
    # The shell blocks' commands parse (above); commands in a sentence are often fragments (`finetune sample
    # --resolution`, `finetune export --to kohya`) that cannot, but each option they name must be one of that command's.
    import re

    from finetune.cli.arguments import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    unknown = []
    for path in DOCS:
        prose = re.sub(r"```.*?```", "", (ROOT / path).read_text(), flags=re.S)
        for command, rest in re.findall(r"`finetune ([a-z][a-z-]*)([^`]*)`", prose):
            assert command in commands, f"{path}: finetune {command} is no command"
            options = {option for action in commands[command]._actions for option in action.option_strings}
            unknown += [f"{path}: finetune {command} {option}" for option in re.findall(r"(?<!\S)(--[a-z][\w-]*)", rest) if option not in options]
    assert unknown == []


def test_the_readmes_text_encoder_lora_loads_without_a_warning(monkeypatch, capsys):
    # The README suggested lora.train_text_encoder with recipes/lora.yaml, whose train.cache_text_embeddings: true then
    # loaded with a warning that it does nothing.
    from finetune.cli.arguments import parse_arguments
    from finetune.config.recipe_loading import load_recipe

    monkeypatch.chdir(ROOT)
    commands = [argv for path, argv in finetune_commands() if path == Path("README.md") and "lora.train_text_encoder=true" in argv]
    assert commands, "the README's LoRA section gives the command"
    for argv in commands:
        args = parse_arguments(argv)
        assert load_recipe(args.recipe, args.overrides).lora.train_text_encoder
        assert "warning" not in capsys.readouterr().err, argv


def test_the_help_examples_parse_and_their_recipes_load(monkeypatch):
    # `finetune --help` and each command's epilog show commands to copy, as the docs do; the docs' are parsed above,
    # these were checked only to stay whole (test_cli_help), so a renamed option or key there went unnoticed.
    import argparse
    import re
    import shlex

    from finetune.cli.arguments import build_parser, parse_arguments
    from finetune.config.recipe_loading import load_recipe

    monkeypatch.chdir(ROOT)
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    examples = []
    for epilog in [parser.epilog, *(command.epilog for command in commands.values())]:
        for line in (epilog or "").splitlines():
            if match := re.search(r"(?:^\s*|-m )finetune (\S.*)", line):
                examples.append(re.sub(r"\s{2,}(#|\().*$", "", match[1]))  # "   # writes ...", "     (control and placement suites)"
    assert len(examples) > 30 and {shlex.split(example)[0] for example in examples} == set(commands)
    for example in examples:
        try:
            args = parse_arguments(shlex.split(example))
        except SystemExit:
            raise AssertionError(f"--help: finetune {example} does not parse") from None
        if args.command in ("train", "check-data") and args.recipe:
            assert Path(args.recipe).is_file(), f"--help: finetune {example}: no recipe {args.recipe}"
            load_recipe(args.recipe, args.overrides)
