"""The trained weights a run may start from besides its base model: a LoRA (`lora.init_from`) or a ControlNet
(`controlnet.pretrained`). Said where the run starts (the method's start lines) and recorded in its outputs
(`finetune.init_from`, `finetune.controlnet_pretrained`).

A resume does not read them: its checkpoint holds those weights as trained since, so the file or folder
may have been moved or deleted, and the resumed recipe may leave the key out (a command-line override).
Either way the run's record (recipe_as_run.yaml, the outputs' metadata) keeps where the weights began, from the
checkpoint's recipe (a ControlNet's record in the outputs from its state: by name alone, a folder that has moved
and a hub id are alike); a resumed recipe naming other starting weights is told they are not read.
"""

from __future__ import annotations

from pathlib import Path

from finetune.checkpoints.run_files import read_state
from finetune.config import Recipe
from finetune.console import warn
from finetune.methods import METHODS

STARTING_WEIGHTS = ("lora.init_from", "controlnet.pretrained")


def _get(recipe: Recipe, key: str) -> str | None:
    section, name = key.split(".")
    return getattr(getattr(recipe, section), name)


def starting_weights(recipe: Recipe) -> dict[str, str]:
    """The recipe's starting weights that its method reads, by key (controlnet.pretrained only for method controlnet)."""
    applies = {"lora.init_from": True, "controlnet.pretrained": recipe.method == "controlnet"}
    return {key: _get(recipe, key) for key in STARTING_WEIGHTS if applies[key] and _get(recipe, key)}


def without_starting_weights(recipe: Recipe) -> Recipe:
    """`recipe` with no starting weights: what a resumed run's method builds (the checkpoint's weights replace them).
    Shallow: the other sections are the recipe's own."""
    return recipe.model_copy(update={
        "lora": recipe.lora.model_copy(update={"init_from": None}),
        "controlnet": recipe.controlnet.model_copy(update={"pretrained": None}),
    })  # fmt: skip


def keep_where_weights_began(recipe: Recipe, saved: dict | None) -> None:
    """Set the recipe's starting weights to those of the checkpoint's recipe (`saved`, flat settings; None: a
    checkpoint from before the recipe was kept, which leaves the recipe as it is)."""
    if saved is None:
        return
    for key in STARTING_WEIGHTS:
        began, given = saved.get(key), _get(recipe, key)
        if given is not None and not _same(given, began):  # the checkpoint's weights are used: those began elsewhere
            started = f"from {began} (its recipe's {key})" if began else f"fresh (its recipe had no {key})"
            warn(f"{key} {given} is not read at a resume: the checkpoint holds the weights, which started {started}; "
                 f"to start from {given}, start a new run")  # fmt: skip
        section, name = key.split(".")
        setattr(getattr(recipe, section), name, began)


def _same(given: str, began: str | None) -> bool:
    """The same file or folder (or hub id), however written (a relative path, or from another folder: its absolute one)."""
    return began is not None and (given == began or Path(given).expanduser().resolve() == Path(began).expanduser().resolve())


def resumed_method(recipe: Recipe, checkpoint: Path | None):
    """The recipe's training method, not yet checked or set up. For a resume from `checkpoint`, the recipe's record
    of its starting weights becomes the checkpoint's (`keep_where_weights_began`) and the method is built without
    them, told of the checkpoint (`resuming`: e.g. the layout of the ControlNet it holds)."""
    if checkpoint is None:
        return METHODS[recipe.method](recipe)
    state = read_state(checkpoint)
    keep_where_weights_began(recipe, state.get("recipe"))
    method = METHODS[recipe.method](without_starting_weights(recipe))
    method.resuming(checkpoint, state)
    return method
