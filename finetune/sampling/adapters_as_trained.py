"""Sampling with adapters as they were trained, from what their files record ({name: metadata}, ours or sd-scripts'
read into ours): the prediction type and noise schedule a pipeline follows, the clip skip prompts are encoded with,
the prompt length they are read in. Adapters whose records cannot mix are refused in one line, as is a record no
training writes (a damaged or edited file)."""

from __future__ import annotations

from finetune.errors import FinetuneError
from finetune.models.encoders import TRAINED_TOKEN_LENGTHS
from finetune.models.init_from_record import recorded_clip_skip
from finetune.sampling.samplers import checked


def adapters_prediction_type(adapters: dict[str, dict[str, str]]) -> str | None:
    """The prediction type the adapters ({name: metadata}) were trained for (None where none is recorded):
    a LoRA trained with model.prediction_type=v_prediction on an epsilon base predicts v, and read as
    epsilon it gives noise. Adapters trained for different types do not mix."""
    recorded = {name: meta["finetune.prediction_type"] for name, meta in adapters.items() if meta.get("finetune.prediction_type")}
    if unknown := next((f"{name} records the prediction type {kind!r}" for name, kind in recorded.items() if kind not in ("epsilon", "v_prediction", "sample")), None):
        raise FinetuneError(f"{unknown}, which no model predicts (epsilon, v_prediction or sample): its metadata is damaged or was edited; use another copy of it")
    if len(set(recorded.values())) > 1:
        listed = ", ".join(f"{name} ({kind})" for name, kind in recorded.items())
        raise FinetuneError(f"adapters trained for different prediction types cannot be combined: {listed}")
    return next(iter(recorded.values()), None)


def follow_adapters_schedule(pipeline, adapters: dict[str, dict[str, str]]) -> None:
    """Sample with the adapters' prediction type where it is not the base scheduler's, and on the
    zero-terminal-SNR schedule where they were trained on it."""
    kind = adapters_prediction_type(adapters)
    changes = {} if kind is None or kind == pipeline.scheduler.config.prediction_type else {"prediction_type": kind}
    if adapters_zero_terminal_snr(adapters) and not pipeline.scheduler.config.get("rescale_betas_zero_snr"):
        changes.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    if changes:  # the same sampler (finetune/sampling/samplers.py), on the adapters' schedule
        pipeline.scheduler = checked(type(pipeline.scheduler).from_config(pipeline.scheduler.config, **changes))


def adapters_zero_terminal_snr(adapters: dict[str, dict[str, str]]) -> bool:
    """Whether the adapters were trained with model.zero_terminal_snr (those that record nothing were not);
    adapters trained on the two schedules do not mix."""
    # Ours record it when on (its absence means off); a file from sd-scripts only when on (ss_zero_terminal_snr).
    recorded = {name: meta.get("finetune.zero_terminal_snr") == "true" for name, meta in adapters.items()
                if "finetune.method" in meta or "finetune.zero_terminal_snr" in meta}  # fmt: skip
    if len(set(recorded.values())) > 1:
        listed = ", ".join(f"{name} ({'zero terminal SNR' if on else 'the base schedule'})" for name, on in recorded.items())
        raise FinetuneError(f"adapters trained on different noise schedules cannot be combined: {listed}")
    return any(recorded.values())


def adapters_clip_skip(adapters: dict[str, dict[str, str]]) -> int:
    """The model.clip_skip the adapters ({name: metadata}) were trained with (1 where none is recorded):
    prompts encoded another way than in training miss what the adapter learned."""
    recorded = {name: recorded_clip_skip(meta) for name, meta in adapters.items() if recorded_clip_skip(meta) is not None}
    if len(set(recorded.values())) > 1:
        listed = ", ".join(f"{name} ({skip})" for name, skip in recorded.items())
        raise FinetuneError(f"adapters trained with different clip_skip cannot be combined: {listed}")
    return next(iter(recorded.values()), 1)


def adapters_max_token_length(adapters: dict[str, dict[str, str]]) -> int:
    """The longest model.max_token_length the adapters ({name: metadata}) were trained with (75 where none is
    recorded: ours record it when not 75, sd-scripts' files as ss_max_token_length)."""
    # sd-scripts writes "None" for 75 (no value); any other value no training writes is a damaged or edited file: 7,500,000
    # encoded every prompt in 100,000 chunks, until memory ran out.
    recorded = {name: value for name, meta in adapters.items() if (value := str(meta.get("finetune.max_token_length", ""))) not in ("", "None")}
    if odd := next((f"{name} records a max_token_length of {value}" for name, value in recorded.items() if value not in map(str, TRAINED_TOKEN_LENGTHS)), None):
        raise FinetuneError(f"{odd}, which no training writes (75, 150 or 225, as sd-scripts' too): its metadata is damaged or was edited; use another copy of it")
    # Adapters of different lengths are not refused (different clip skips are): one of them reads prompts as it was
    # trained, and merge too keeps one length.
    return max(map(int, recorded.values()), default=75)
