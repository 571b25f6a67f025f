"""Per-prompt sampling options, written after the prompt as sd-scripts' sample-prompt files write them.

    a photo of sks dog on a beach --n blurry, lowres --d 7 --l 5.5 --s 30

`--n` is the negative prompt, `--d` the seed, `--l` the guidance scale, `--s` the number of steps and
`--ss` the sampler (finetune/sampling/samplers.py's names, or sd-scripts' for them: k_euler, k_euler_a, dpmsolver++);
each replaces the section's own setting (validation.*, or the command's options) for that prompt
only. Option letters are read in any case, and an option starts at " --", as in sd-scripts. Its other
options (`--w`/`--h` sizes, `--cn`, `--am`, `--f`) are accepted and ignored, so its prompt lines can
be pasted: a grid's images share the run's resolution. Any other option is refused (a typo would
otherwise vanish), as is a sampler with none here (sd-scripts' heun, lms, dpm_2, ...).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from finetune.sampling.samplers import DEFAULT_SAMPLER, SAMPLER_CHOICES, sampler_named, steps_problem

# Option letter -> (field of PromptSettings, the type its value is read as, what it means).
OPTIONS = {
    "n": ("negative_prompt", str, "negative prompt"),
    "d": ("seed", int, "seed"),
    "l": ("guidance_scale", float, "guidance scale"),
    "s": ("num_inference_steps", int, "steps"),
    "ss": ("sampler", sampler_named, "sampler"),
}
IGNORED = ("w", "h", "cn", "am", "f")  # sd-scripts' other options: sizes, ControlNet image, ...
MAX_SEED = 2**63 - 1  # torch's generators take a signed 64-bit seed
# Below the schedulers' 1000 training timesteps: DDIM with SD's steps_offset 1 reaches timestep 1000 at 1000
# steps (an IndexError after loading), and 999 steps or fewer stay within them (sd-scripts caps --s at 1000).
MAX_STEPS = 999
# The webui's prompt weighting with a number, "(sks dog:1.3)", which sd-scripts' sampling also reads; a plain
# "(words)" (1.1 there) is too often ordinary text, as in "kirby (series)", to be taken for it.
WEIGHTED = re.compile(r"\([^()]*:\s*[-+]?(?:\d+\.?\d*|\.\d+)\s*\)")
LORA_TAG = re.compile(r"<(?:lora|lyco|hypernet):[^<>]*>", re.IGNORECASE)  # the webui's adapter tags, "<lora:name:0.8>"


@dataclass(frozen=True)
class PromptSettings:
    """How one prompt is sampled: the section's or command's settings, with the prompt's own options applied (`with_options`)."""

    prompt: str
    negative_prompt: str | None
    seed: int
    guidance_scale: float
    num_inference_steps: int
    sampler: str | None = None  # a --ss's (finetune/sampling/samplers.py's name); None: the pipeline's own


def prompts_settings(prompts: list[str], negative_prompt: str | None, seed: int, guidance: float, steps: int, sampler: str = DEFAULT_SAMPLER) -> list[PromptSettings]:
    """Each `--prompt` with its own options (--n, --d, --l, --s, --ss), the others from the command's; one line for an option
    that is unknown or has no valid value, or for steps the prompt's sampler cannot draw (`steps_problem`)."""
    from finetune.errors import FinetuneError

    try:
        settings = [with_options(text, PromptSettings(text, negative_prompt, seed, guidance, steps)) for text in prompts]
    except ValueError as err:
        raise FinetuneError(f"--prompt {err}") from None
    for text, prompt in zip(prompts, settings):
        if problem := steps_problem(prompt.sampler or sampler, prompt.num_inference_steps):
            own = prompt.sampler is not None or prompt.num_inference_steps != steps  # its --ss or --s
            raise FinetuneError(f"{f'--prompt {text!r}' if own else '--steps with --sampler'}: {problem}")
    return settings


def with_options(text: str, defaults: PromptSettings) -> PromptSettings:
    """The prompt of `text` with the settings its options give, the others from `defaults`; a ValueError
    names an option that is unknown or has no valid value."""
    prompt, *options = (" " + text).split(" --")  # the space: a text that is only options ("--n blurry") has an empty prompt
    settings = replace(defaults, prompt=prompt.strip())
    for option in options:
        name, _, value = option.strip().partition(" ")
        letter, value = name.lower(), value.strip()
        if letter in IGNORED:
            continue
        if letter not in OPTIONS:
            known = ", ".join(f"--{key} ({meaning})" for key, (_, _, meaning) in OPTIONS.items())
            raise ValueError(f"'{text}': unknown option --{name} (' --' starts an option); the options are {known}")
        field, kind, meaning = OPTIONS[letter]
        try:
            parsed = kind(value)
        except ValueError:
            choices = f" ({SAMPLER_CHOICES})" if letter == "ss" else ""
            raise ValueError(f"'{text}': --{name} needs a {meaning}{choices}, got '{value}'") from None
        if (letter == "d" and not 0 <= parsed <= MAX_SEED) or (letter == "s" and not 1 <= parsed <= MAX_STEPS) or (letter == "l" and not math.isfinite(parsed)):
            limits = {"d": f"0 to {MAX_SEED}", "s": f"1 to {MAX_STEPS}", "l": "a finite number"}[letter]
            raise ValueError(f"'{text}': --{name} {value} is out of range ({limits})")
        settings = replace(settings, **{field: parsed})
    return settings


def guidance_notes(settings: list[PromptSettings], raise_it: str = "--guidance (or a prompt's --l)") -> list[str]:
    """What classifier-free guidance at 1 or below leaves unused, said rather than silently dropped: diffusers' pipelines
    (as sd-scripts) run it only above 1, so a negative prompt there changes nothing, and a guidance between 0 and 1 (or
    below 0) samples as 1 does, the prompt alone (0 is diffusers' usual way to turn guidance off, and needs no note).
    `raise_it`: what the user raises (the command's options; the demo's guidance slider)."""
    notes = []
    unused = sorted({p.guidance_scale for p in settings if p.negative_prompt and p.guidance_scale <= 1})
    if unused:
        listed = ", ".join(f"{g:g}" for g in unused)
        notes.append(f"negative prompts act through classifier-free guidance, which is off at guidance {listed} (1 or below): "
                     f"they change nothing there; raise {raise_it} above 1 to use them")  # fmt: skip
    as_one = sorted({p.guidance_scale for p in settings if p.guidance_scale < 1 and p.guidance_scale != 0})
    if as_one:
        listed = ", ".join(f"{g:g}" for g in as_one)
        notes.append(f"guidance {listed} samples as guidance 1 does (classifier-free guidance runs only above 1): the prompt alone steers")
    return notes


def webui_syntax_notes(settings: list[PromptSettings]) -> list[str]:
    """A note when prompts (or negative prompts) use the webui's "(words:1.3)" weighting or its "<lora:name:0.8>"
    tags, which nothing here reads: diffusers' pipelines, as training reads captions, encode them as words."""
    texts = dict.fromkeys(text for prompt in settings for text in (prompt.prompt, prompt.negative_prompt) if text)  # a shared negative once
    notes = []
    for pattern, what, remedy in (
        (WEIGHTED, "prompt weighting", "its parentheses, colon and number are encoded as words, as training reads captions; write the words without them"),
        (LORA_TAG, "LoRA tag", "it is encoded as words and loads nothing (sample takes --lora, the demo its LoRA lists, validation samples the one in training): leave it out"),
    ):
        found = [match.group(0) for text in texts if (match := pattern.search(text))]
        if found:
            more = len(found) - 1
            others = f" (and {more} more prompt{'s' if more > 1 else ''})" if more else ""
            notes.append(f"'{found[0]}'{others} is the webui's {what}, which is not read here: {remedy}")
    return notes


def unread_options_notes(texts: list[str]) -> list[str]:
    """A note when texts that nothing parses for options (the demo's prompt boxes) hold sd-scripts' per-prompt options,
    as a validation or sample prompt pasted there does: encoded as words they set nothing, and the image is another
    than validation's or sample's for the same line."""
    found = [f"--{option.strip()}" for text in texts if text for option in (" " + text).split(" --")[1:]
             if option.strip().partition(" ")[0].lower() in (*OPTIONS, *IGNORED)]  # fmt: skip
    if not found:
        return []
    return [f"'{found[0]}' is an option of validation's and sample's prompts, which is not read here: it is encoded as words; "
            "set the negative prompt, seed, guidance, steps and sampler in their own fields"]  # fmt: skip
