"""Per-prompt sampling options, written after the prompt as sd-scripts' sample-prompt files write them.

    a photo of sks dog on a beach --n blurry, lowres --d 7 --l 5.5 --s 30

`--n` is the negative prompt, `--d` the seed, `--l` the guidance scale and `--s` the number of steps;
each replaces the section's own setting (validation.*, or the command's options) for that prompt
only. Sizes (`--w`, `--h`) are refused: a grid's images share one size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# Option letter -> (field of PromptSettings, the type its value is read as, what it means).
OPTIONS = {
    "n": ("negative_prompt", str, "negative prompt"),
    "d": ("seed", int, "seed"),
    "l": ("guidance_scale", float, "guidance scale"),
    "s": ("num_inference_steps", int, "steps"),
}


@dataclass(frozen=True)
class PromptSettings:
    prompt: str
    negative_prompt: str | None
    seed: int
    guidance_scale: float
    num_inference_steps: int


def with_options(text: str, defaults: PromptSettings) -> PromptSettings:
    """The prompt of `text` with the settings its options give, the others from `defaults`; a ValueError
    names an option that is unknown or has no valid value."""
    prompt, *options = text.split(" --")
    settings = replace(defaults, prompt=prompt.strip())
    for option in options:
        letter, _, value = option.strip().partition(" ")
        if letter in ("w", "h"):
            raise ValueError(f"'{text}': --{letter} (a size) is not supported: every image of a grid has the resolution of the run")
        if letter not in OPTIONS:
            known = ", ".join(f"--{key} ({meaning})" for key, (_, _, meaning) in OPTIONS.items())
            raise ValueError(f"'{text}': unknown option --{letter}; the options are {known}")
        field, kind, meaning = OPTIONS[letter]
        try:
            parsed = kind(value.strip())
        except ValueError:
            raise ValueError(f"'{text}': --{letter} needs a {meaning}, got '{value.strip()}'") from None
        if letter == "s" and parsed < 1:
            raise ValueError(f"'{text}': --s needs at least 1 step")
        settings = replace(settings, **{field: parsed})
    return settings
