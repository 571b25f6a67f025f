"""Recipe files to a validated `Recipe`: YAML loading, `key=value` overrides, and pydantic's errors
turned into one line that names the key (and the closest valid one for a typo: `finetune.config.recipe_keys`).

The schema itself, every section and its validation, is the finetune/config package.
"""

from __future__ import annotations

import difflib
import re
import shlex
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import ValidationError

from finetune.config import Recipe
from finetune.config.recipe_keys import describe_validation_error, field_at, section_type
from finetune.config.recipe_paths import require_unambiguous_data_paths
from finetune.config.recipe_warnings import print_empty_recipe, print_unused_settings
from finetune.config.run_recipe import EARLIER_RUN_RECIPE, RUN_RECIPE, RUN_RECIPE_HEADER, read_where_the_run_is
from finetune.errors import FinetuneError


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `key.sub=value` overrides, validate, or raise a one-line FinetuneError."""
    path = Path(path)
    if path.is_dir():
        from finetune.data.sources import folder_images  # PIL: only for this message

        if folder_images(path):  # `finetune train photos`: the images meant as the data
            raise FinetuneError(f"recipe {path} is a folder of images: pass a recipe, and the folder as its data, e.g. recipes/lora.yaml data.image_dir={path}")
        if (path / RUN_RECIPE).is_file():  # `finetune train outputs/lora --resume latest`: the run's folder for its recipe
            raise FinetuneError(f"recipe {path} is a training run's folder: pass the recipe it ran with, {path / RUN_RECIPE} "
                                f"(to continue that run: finetune train {shlex.quote(str(path / RUN_RECIPE))} --resume latest)")  # fmt: skip
        raise FinetuneError(f"recipe {path} is a folder: pass the path of a YAML file in it, such as recipes/lora.yaml")
    if not path.is_file():
        if path.name == RUN_RECIPE and (path.parent / EARLIER_RUN_RECIPE).is_file():  # a run of an earlier version, resumed as the docs now say
            raise FinetuneError(f"recipe {path} not found: a run of an earlier finetune kept its recipe as run as {EARLIER_RUN_RECIPE}: "
                                f"pass {path.parent / EARLIER_RUN_RECIPE}")  # fmt: skip
        if looks_like_override(str(path)):  # `finetune train data.image_dir=photos`, the recipe left out
            raise FinetuneError(f"recipe {path} not found: an override comes after the recipe, e.g. recipes/lora.yaml {path}")
        raise FinetuneError(f"recipe {path} not found: {_recipe_near(path) or 'pass the path of a YAML file such as recipes/lora.yaml'}")
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        raise FinetuneError(f"recipe {path} is not valid YAML: {_yaml_problem(err)}") from None
    except UnicodeDecodeError as err:
        raise FinetuneError(_not_utf8(path, err)) from None
    if raw == {} and not overrides:  # else every default would load, and the first complaint would be a missing data source
        raise FinetuneError(f"recipe {path} is empty (or only comments): write its settings, e.g. start from a copy of recipes/lora.yaml")
    if raw == {}:
        print_empty_recipe(path)
    if not isinstance(raw, dict):
        raise FinetuneError(f"recipe {path} must be a mapping of keys to values at the top level")
    if text.startswith(RUN_RECIPE_HEADER):  # a run's record: its paths as of where its folder is now (the overrides' are the user's)
        read_where_the_run_is(raw, path)
    for override in overrides:
        apply_override(raw, override, source=str(path))
    _length_from_the_command_line(raw, overrides)
    try:
        recipe = recipe_from_dict(raw, source=str(path))
    except FinetuneError as err:  # a key set on the command line is the override's fault, not the file's
        named = re.search(r"key '([^']+)'", str(err))
        for override in reversed(overrides):  # the last override of a key is the one that counts
            key = _override_key(override)
            # data.folders=[...] and its data.folders.0.repeats; validation.prompts.0=... and its list validation.prompts
            if named and (named.group(1) == key or named.group(1).startswith(key + ".") or re.fullmatch(rf"{re.escape(named.group(1))}\.\d+", key)):
                raise FinetuneError(f"override '{override}'{_removals_on_the_command_line(str(err).removeprefix(str(path)), overrides)}") from None
        if causes := _overrides_named(str(err), overrides):  # a check across keys: each override it names is a cause
            named = " and ".join(f"'{cause}'" for cause in causes)
            message = _removals_on_the_command_line(str(err).removeprefix(str(path)), overrides)
            raise FinetuneError(f"override{'s' if len(causes) > 1 else ''} {named}{message}") from None
        raise
    print_unused_settings(raw, recipe)
    # A run's record (recipe_as_run.yaml, resumed from) holds the paths its run read from the folder it started in; its
    # own folder is the output_dir, which no path of it means ('.' given on that run's command line names it too).
    if not text.startswith(RUN_RECIPE_HEADER):
        require_unambiguous_data_paths(recipe, path, tuple(_override_key(override) for override in overrides))
    return recipe


def _removals_on_the_command_line(message: str, overrides: list[str]) -> str:
    """An override's fault whose line says "remove K" of a key the recipe file sets: no override removes a key, but K=null
    gives it its default where that is none (`dreambooth.train_text_encoder=false` on a recipe that sets
    dreambooth.text_encoder_lr was told to remove that, and `=null` was left to guess). A K an override sets: drop it."""
    given = {_override_key(override) for override in overrides}

    def with_null(removal: re.Match) -> str:
        field = None if removal.group(1) in given else field_at(removal.group(1).split("."))
        unset = field is not None and not field.is_required() and field.get_default(call_default_factory=True) is None
        return f"{removal.group(0)} ({removal.group(1)}=null on the command line)" if unset else removal.group(0)

    return re.sub(r"\bremove ([a-z_]+(?:\.[a-z_0-9]+)+)", with_null, message)


def looks_like_override(text: str) -> bool:
    """Whether `text`, given where a recipe's path goes, is a key=value override: an `=` in its first part, where that names
    no folder (a sweep's runs/lr=1e-4/lora.yaml is a path)."""
    first = next(iter(Path(text).parts), "")
    return "=" in first and not Path(first).is_dir()


def _recipe_near(path: Path) -> str | None:
    """'did you mean ...' for a recipe beside the one not found whose name is close (lora.yml for lora.yaml, dreambooth_lora
    for dreambooth-lora), or None."""
    folder = path.parent if path.parent.is_dir() else None
    names = sorted(p.name for p in folder.iterdir() if p.suffix in (".yaml", ".yml")) if folder else []
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.8)
    return f"did you mean {folder / close[0]}?" if close else None


def _not_utf8(path: Path, err: UnicodeDecodeError) -> str:
    """What a recipe that is not UTF-8 is: text in another encoding (PowerShell's `>` writes UTF-16, older
    editors Latin-1) was called 'not a text file'; an image or a model file given in the recipe's place is not one."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return f"recipe {path} is UTF-16 text (as Windows PowerShell's > writes): save it as UTF-8"
    if b"\0" in data[:4096]:
        return f"recipe {path} is not a text file: pass the path of a YAML file such as recipes/lora.yaml"
    line = data[: err.start].count(b"\n") + 1
    return f"recipe {path} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}; saved as Latin-1 or Windows-1252?): save it as UTF-8"


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's problem and where it is, on one line: its first line alone was often only the context
    ("while scanning for the next token"), without the line or the problem (a tab)."""
    mark = getattr(err, "problem_mark", None)
    if isinstance(err, _DuplicateKey) or not getattr(err, "problem", None) or mark is None:
        return str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    if "'\\t'" in err.problem:  # a tab where YAML wants an indent or a token
        return f"a tab on {where}: use spaces there (YAML takes no tabs in indentation or between tokens)"
    context = f" ({err.context} from line {err.context_mark.line + 1})" if getattr(err, "context", None) and err.context_mark else ""
    hint = "; a value with ': ' in it? quote it (or an indent is off)" if err.problem.startswith("mapping values are not allowed") else ""
    if "escape" in err.problem and "double-quoted" in (err.context or ""):  # "C:\Users\me": \U starts an escape
        hint = "; a Windows path? in double quotes a backslash starts an escape: write it in single quotes ('C:\\data'), or with forward slashes"
    return f"{err.problem} on {where}{context}{hint}"


class _DuplicateKey(yaml.constructor.ConstructorError):
    """A key given twice in one section (its message says where)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key given twice in one section is an error: PyYAML keeps the last one, so a
    section pasted twice (a second train: at the end of the file) would silently replace the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:  # as written: a merge (<<: *base) may be overridden key by key
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.value in seen:
                raise _DuplicateKey(
                    None, None, f"key '{key_node.value}' is given twice in one section (again on line {key_node.start_mark.line + 1}): keep one", key_node.start_mark
                )
            seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def _length_from_the_command_line(raw: dict[str, Any], overrides: list[str]) -> None:
    """`train.max_epochs=10` on the command line replaces the recipe's train.max_steps (and the other way
    round), instead of the two clashing; both given there are left to clash, and `=null` replaces nothing."""
    given = {_override_key(override) for override in overrides}
    for key, other in (("max_steps", "max_epochs"), ("max_epochs", "max_steps")):
        train = raw.get("train")
        if f"train.{key}" in given and f"train.{other}" not in given and isinstance(train, dict) and train.get(key) is not None:
            train.pop(other, None)


def _overrides_named(message: str, overrides: list[str]) -> list[str]:
    """The overrides (the last of each key, in command-line order) a check across keys names: by their key ("train.max_steps
    (12)"), or by a section they set a key of ("data.bucketing at data.resolution 64" names data.bucketing.enabled=true,
    which turned that bucketing on: blaming data.resolution=64 alone told to change what had been fine before)."""
    named = set(re.findall(r"(?<![\w.])[a-z_]+(?:\.\w+)+(?![\w.])", message))
    last = {_override_key(override): override for override in overrides}
    return [override for key, override in last.items() if any(key == name or key.startswith(name + ".") for name in named)]


def _override_key(override: str) -> str:
    """An override's dotted key as errors name it: `concepts[0]` is `concepts.0` (as `apply_override` reads it), no spaces."""
    return re.sub(r"\[(\d+)\]", r".\1", re.sub(r"\s+", "", override.split("=", 1)[0]))


def recipe_from_dict(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise FinetuneError(f"{source}: {describe_validation_error(err)}") from None


def apply_override(raw: dict[str, Any], override: str, source: str = "command line") -> None:
    """Apply `optimizer.lr=1e-4` to a nested dict. A text key takes the text as typed (a caption with
    a `#`, a folder named `2024-01-01`, `mixed_precision=no`); other values are parsed as YAML
    (numbers, lists, null).

    A number in the path indexes a list: `dreambooth.concepts.0.instance_dir=photos` (or `concepts[0]`).
    """
    if "=" not in override:
        raise FinetuneError(f"override '{override}' must look like key=value, e.g. optimizer.lr=1e-4")
    dotted, value_text = override.split("=", 1)
    keys = re.sub(r"\[(\d+)\]", r".\1", dotted.strip()).split(".")
    value = _override_value(keys, value_text, override)
    node: Any = raw
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                at = ".".join(keys[:depth])
                entry = _entry_example(keys[:depth])
                adding = f": to add an entry, give the whole list, e.g. {at}=[{entry}, {entry}]" if key == str(len(node)) else ""  # a second concept
                raise FinetuneError(f"override '{override}': '{key}' is not an index of the list at '{at}' in {source}, which has {len(node)}{adding}")
            if last:
                node[int(key)] = value
            else:
                node = node[int(key)]
        elif isinstance(node, dict):
            if not last and keys[depth + 1].isdigit() and not isinstance(node.get(key), list):
                # An index into a list the recipe does not have: say how to give the list instead.
                raise FinetuneError(
                    f"override '{override}': {source} has no list at '{'.'.join(keys[: depth + 1])}' to index; "
                    f"give the whole list instead, e.g. {'.'.join(keys[: depth + 1])}=[{_entry_example(keys[: depth + 1])}]"
                )
            if last:
                node[key] = value
            else:
                if node.get(key) is None:  # not there, or a section whose keys are all commented out (`lora:`): the override gives it keys
                    node[key] = {}
                node = node[key]
        else:
            raise FinetuneError(f"override '{override}': '{keys[depth - 1]}' is not a section in {source}")


def _entry_example(keys: list[str]) -> str:
    """How an entry of the list at `keys` is written in an example: {...} for a section (a concept), ... for a value (a prompt)."""
    return "{...}" if section_type(_annotation_at(keys)) is not None else "..."


def _override_value(keys: list[str], text: str, override: str) -> Any:
    if not text.strip() or text.strip() in ("null", "~"):
        return None
    annotation, stripped = _annotation_at(keys), text.strip()
    quoted = len(stripped) > 1 and stripped[0] == stripped[-1] and stripped[0] in "'\""
    a_list = stripped.startswith("[") and _takes(annotation, list)
    if _takes(annotation, str) and not quoted and not a_list:
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise FinetuneError(f"override '{override}': the value is not valid YAML ({str(err).splitlines()[0]}): quote it") from None


def _annotation_at(keys: list[str]) -> Any:
    """The schema's type for a dotted path (list indexes skipped), or None for a key it does not have."""
    annotation: Any = Recipe
    for key in keys:
        if key.isdigit():
            continue
        model = section_type(annotation)
        if model is None or key not in model.model_fields:
            return None
        annotation = model.model_fields[key].annotation
    return annotation


def _takes(annotation: Any, kind: type) -> bool:
    """Whether a field of this type takes a `kind` (str or list): the type itself, a Literal of strings,
    or a member of an Optional/Union (class_prompt takes both)."""
    origin = typing.get_origin(annotation)
    if annotation is kind or origin is kind:
        return True
    if origin is typing.Annotated:  # e.g. UserPath: a str with a validator
        return _takes(typing.get_args(annotation)[0], kind)
    if origin is Literal:
        return kind is str and all(isinstance(choice, str) for choice in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return any(_takes(member, kind) for member in typing.get_args(annotation))
    return False
