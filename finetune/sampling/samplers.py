"""The samplers validation, `finetune sample` and the demo may draw with, by the names creators know from the webui and
ComfyUI, each a diffusers scheduler made `from_config` of the run's noise schedule: the base's betas, the prediction type
training targets and the zero-terminal-SNR schedule (rescale_betas_zero_snr, trailing spacing) carry over, so a sampler
changes how the steps are taken, never what the model was trained for."""

from __future__ import annotations

from typing import Literal, get_args

# The default, DDIM, is what every sample drew with before there was a choice: pinned images and tests stay as they were.
SamplerName = Literal["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc"]
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)
DEFAULT_SAMPLER = "ddim"
# sd-scripts' names (its --sample_sampler, and a sample prompt's --ss) of the samplers here: its DPMSolverMultistep
# "dpmsolver++" is diffusers' default of it, order 2 without Karras sigmas. Its others (ddpm, pndm, lms, heun, dpm_2,
# dpm_2_a, dpmsolver, dpmsingle; k_ names included) have none here.
SD_SCRIPTS_NAMES = {"k_euler": "euler", "k_euler_a": "euler_a", "dpmsolver++": "dpmpp_2m"}
# The webui's names (its sampler list, and what its infotext's Sampler field says), read in any case. Its "DPM++ 2M" alone
# is on Karras sigmas since webui 1.9 (its "Automatic" schedule type for it), so that is what it names here.
# "DPM++ 2M Uniform": the demo's list's name (`webui_label`) of the plain one. DDIM, Euler and UniPC are ours in another case.
WEBUI_NAMES = {"Euler a": "euler_a", "DPM++ 2M Karras": "dpmpp_2m_karras", "DPM++ 2M": "dpmpp_2m_karras", "DPM++ 2M Uniform": "dpmpp_2m"}
_OTHER_NAMES = {**SD_SCRIPTS_NAMES, **WEBUI_NAMES}
_BY_LOWER_CASE = {other.lower(): ours for other, ours in _OTHER_NAMES.items()}
SAMPLER_CHOICES = ", ".join(name + "".join(f' or "{other}"' if " " in other else f" or {other}" for other, ours in _OTHER_NAMES.items() if ours == name)
                            for name in SAMPLER_NAMES)

# name: (diffusers scheduler class, the settings that make it that sampler), as the webui's names map onto diffusers.
_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),  # "Euler a"
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
# Settings a scheduler config of one kind carries that would make another kind another sampler (a dpmpp_2m_karras
# pipeline's config handed to euler must not bring its Karras sigmas): each kind gets its own, or diffusers' default.
_SAMPLER_SETTINGS = ("algorithm_type", "solver_order", "use_karras_sigmas")

# The webui's own names, as an image's settings (its PNG "parameters", which the PNG Info tab sends to txt2img) must spell a
# sampler: the webui looks the Sampler field up by these labels and takes its default sampler (DPM++ 2M) for any other, so
# "Sampler: euler_a" drew with DPM++ 2M there. Its "DPM++ 2M" alone means Karras sigmas since webui 1.9, hence the plain
# one's schedule; "DPM++ 2M Karras" reads as DPM++ 2M on Karras sigmas in the webui before 1.9 and since.
_WEBUI_SAMPLERS = {"ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M, Schedule type: Uniform",
                   "dpmpp_2m_karras": "DPM++ 2M Karras", "unipc": "UniPC"}


def webui_sampler_fields(name: str) -> str:
    """'Sampler: Euler a': sampler `name` (ours) as the webui's infotext writes it, with its schedule type where needed."""
    return f"Sampler: {_WEBUI_SAMPLERS[name]}"


def webui_label(name: str) -> str:
    """Sampler `name` (ours) as a list shows it to a webui user: "Euler a"; dpmpp_2m as "DPM++ 2M Uniform", its DPM++ 2M
    on the Uniform schedule type (its plain "DPM++ 2M" is dpmpp_2m_karras)."""
    return _WEBUI_SAMPLERS[name].replace(", Schedule type: ", " ")


def sampler_named(name: str) -> str:
    """The sampler here that `name` (ours, sd-scripts' or the webui's, in any case: "Euler a") names; a ValueError listing
    the choices for any other."""
    key = " ".join(name.split()).lower()
    if key in SAMPLER_NAMES:
        return key
    if key in _BY_LOWER_CASE:
        return _BY_LOWER_CASE[key]
    raise ValueError(f"no sampler here is named {name!r}: choose {SAMPLER_CHOICES}")


def sampler_scheduler(name: str, config, **changes):
    """The scheduler of sampler `name` on the noise schedule of scheduler `config` (the base's, as training changed it),
    with `changes` (e.g. the base's own prediction type for what the base itself draws)."""
    import diffusers

    if name not in _SCHEDULERS:  # the recipe's Literal and the options' choices say it first; this is for other callers
        raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLER_NAMES)}")
    class_name, settings = _SCHEDULERS[name]
    kept = {key: value for key, value in dict(config).items() if key not in _SAMPLER_SETTINGS}
    return checked(getattr(diffusers, class_name).from_config(kept, **settings, **changes))


# Karras sigmas on the zero-terminal-SNR schedule (its last sigma 4096) crowd the last timestep: 25 steps repeat 999 and
# 998, and diffusers' DPM++ solver (0.42) then steps past the end of its sigmas, an IndexError in the first image.
KARRAS_ON_ZERO_TERMINAL_SNR = ("the dpmpp_2m_karras sampler cannot draw on the zero-terminal-SNR schedule (its Karras sigmas crowd the "
                               "last timestep, where diffusers' DPM++ solver steps past its end): pick dpmpp_2m, euler, euler_a, unipc or ddim")


# diffusers' DPM++ and UniPC (0.42) space "leading" steps, SD1.x's and SD2.x's own, num_train_timesteps // (steps + 1) apart
# from timestep steps_offset: at 999 steps the first is timestep 1000, past the 1000 trained (0 to 999), and every image
# came out NaN (the shipped toy-world base); 998 steps draw. DDIM, Euler and Euler a space them // steps: 999 draws.
MOST_STEPS = {"dpmpp_2m": 998, "unipc": 998}


def steps_problem(sampler: str, steps: int) -> str | None:
    """Why sampler `sampler` cannot draw `steps` steps (the end of a line naming where they were asked), or None."""
    most = MOST_STEPS.get(sampler)
    if most is None or steps <= most:
        return None
    return (f"the {sampler} sampler draws at most {most} steps, got {steps} (at {most + 1}, diffusers' DPM++ and UniPC start past "
            f"the model's last timestep and every image is NaN): ask {most} or fewer, or another sampler")


def trailing_steps_problem(steps: int, num_train_timesteps: int = 1000) -> str | None:
    """Why `steps` steps cannot be drawn on "trailing" spacing (model.zero_terminal_snr's, or a base's own), or None.
    diffusers (0.42) spaces them np.arange(num_train_timesteps, 0, -num_train_timesteps / steps): where float rounding
    leaves a last one just above 0 (61, 103, 121, ... steps; 62 counts up to 999) it takes a step more, at timestep -1."""
    import numpy as np

    def taken(count: int) -> int:
        return len(np.arange(num_train_timesteps, 0, -num_train_timesteps / count))

    if taken(steps) == steps:
        return None
    # The nearest that draws, looked for outward (a schedule of 999 timesteps has 6 such counts in a row, 968 to 973; one step always draws).
    near = next(count for apart in range(1, steps) for count in (steps - apart, steps + apart) if 1 <= count < num_train_timesteps and taken(count) == count)
    return (f"{steps} steps on trailing timestep spacing (the zero-terminal-SNR schedule's) are {steps + 1} in diffusers, the last at "
            f"timestep -1 (unipc's images can come out NaN; the other samplers take a last step at the wrong noise level): ask {near}")


def spacing_steps_problem(scheduler, steps: int) -> str | None:
    """`trailing_steps_problem` of `steps` where `scheduler` spaces its steps "trailing" (the adapters' zero-terminal-SNR
    schedule, or a base's own), else None: what `finetune sample`, eval and the demo check once their pipeline is made."""
    if scheduler.config.get("timestep_spacing") != "trailing":
        return None
    return trailing_steps_problem(steps, scheduler.config.num_train_timesteps)


def checked(scheduler):
    """`scheduler`, where it can draw on its schedule; else a FinetuneError of one line saying which sampler to pick."""
    from finetune.errors import FinetuneError

    if scheduler.config.get("use_karras_sigmas") and scheduler.config.get("rescale_betas_zero_snr"):
        raise FinetuneError(KARRAS_ON_ZERO_TERMINAL_SNR)
    return scheduler


def sampler_of(scheduler) -> str | None:
    """The name of the sampler `scheduler` is (`sampler_scheduler`'s), None for another scheduler."""
    for name, (class_name, settings) in _SCHEDULERS.items():
        if type(scheduler).__name__ == class_name and all(scheduler.config.get(key) == value for key, value in settings.items()):
            return name
    return None
