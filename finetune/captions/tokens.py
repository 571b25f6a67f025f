"""Counting caption tokens with the base model's tokenizer alone: what `finetune check-data` and the
start of a run say about captions past model.max_token_length, without loading the models."""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer

from finetune.captions.captions import caption_lines
from finetune.config import SINGLE_FILE_SUFFIXES, ModelConfig
from finetune.errors import FinetuneError
from finetune.models.model_source import hub_files
from finetune.sampling.prompt_options import WEIGHTED

TOKENIZER_FILES = ("vocab.json", "merges.txt")  # what a CLIP tokenizer is made of (or one tokenizer.json, as ours)
# Captions counted per tokenizer call: one call on 20,000 captions held every token's ids, offsets and strings at once
# (220 MB more peak memory for tag lists of some 30 tokens; 15 MB in calls of this many), at the start of a run too.
TOKENIZED_AT_ONCE = 1000


def load_tokenizer(config: ModelConfig) -> CLIPTokenizer:
    """The base model's tokenizer alone, nothing else loaded or downloaded: from its diffusers folder, a
    single file's `model.single_file_config` folder, or the hub (its tokenizer/ files only)."""
    source, key = config.pretrained, config._key
    if Path(source).suffix.lower() in SINGLE_FILE_SUFFIXES:
        if not config.single_file_config:  # the tokenizer comes with the configs diffusers picks when the file loads
            raise FinetuneError(f"{source} is a single file: its tokenizer is known once it loads")
        source, key = config.single_file_config, config._single_file_config_key
    if not Path(source).is_dir():
        # As training fetches the base (from the cache, else downloaded; the cache only with HF_HUB_OFFLINE=1).
        # hf_hub_download, with the hub out of reach and nothing cached, retried each file for 23 s, printing the
        # hub's warnings before our line saying the tokenizer is not at hand; snapshot_download gives up at once.
        source = hub_files(source, key, config.revision, allow_patterns=["tokenizer/*"])
    # Its files first: without them transformers builds an empty tokenizer that splits text by characters.
    folder = Path(source) / "tokenizer"
    if not (folder / "tokenizer.json").is_file() and not all((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FinetuneError(f"{source} has no tokenizer/ (tokenizer.json, or {' and '.join(TOKENIZER_FILES)})")
    return CLIPTokenizer.from_pretrained(folder)


def long_captions_line(tokenizer: CLIPTokenizer, captions: dict[str, str], max_token_length: int = 75, shuffled: bool = False) -> str | None:
    """A warning for the captions ({source: caption}) cut at `max_token_length` tokens (model.max_token_length,
    the start and end marks not counted), naming the longest; None if none. `shuffled`: data.shuffle_tags
    is on, so the tags past the cut are others at each use.

    Said once at the start, not per batch: what is past the cut does not train, however much care went into it."""
    lines = {source: caption_lines(caption) or [caption] for source, caption in captions.items()}  # each line trains on its own
    unique = sorted({line for texts in lines.values() for line in texts})
    lengths: dict[str, int] = {}
    for first in range(0, len(unique), TOKENIZED_AT_ONCE):
        chunk = unique[first : first + TOKENIZED_AT_ONCE]
        lengths.update(zip(chunk, (len(ids) - 2 for ids in tokenizer(chunk, truncation=False, verbose=False)["input_ids"])))
    longest_line = {source: max(lengths[line] for line in texts) for source, texts in lines.items()}
    cut = {source: length for source, length in longest_line.items() if length > max_token_length}
    if not cut:
        return None
    longest = max(cut, key=cut.get)
    longer = [length for length in (150, 225) if length > max_token_length]  # sd-scripts' long-caption lengths
    remedy = "shorten those captions" + (f", or raise model.max_token_length to {' or '.join(map(str, longer))} (sd-scripts' long captions)" if longer else "")
    # Shuffled, every tag past data.keep_tokens falls past the cut in some epochs: it trains less often, not never.
    past_the_cut = "with data.shuffle_tags other tags fall past the cut at each use: they train less often, not never" if shuffled else "the words past the cut do not train"
    return (
        f"{len(cut)} of {len(captions)} captions are longer than model.max_token_length ({max_token_length} tokens) and are cut there "
        f"(the longest: {longest}, {cut[longest]} tokens): {past_the_cut}; {remedy}"
    )


def weighted_captions_line(captions: dict[str, str]) -> str | None:
    """A warning for the captions ({source: caption}) written with the webui's "(words:1.2)" weighting, naming
    the first; None if none. Training reads it as words, as sd-scripts does without its --weighted_captions."""
    weighted = {source: match.group(0) for source, caption in captions.items() if (match := WEIGHTED.search(caption or ""))}
    if not weighted:
        return None
    first = next(iter(weighted))
    return (f"{len(weighted)} of {len(captions)} captions use the webui's prompt weighting (the first: {first}, '{weighted[first]}'), "
            "which training does not read: its parentheses, colon and number train as words; write the words without them")


def caption_warnings(tokenizer: CLIPTokenizer | None, captions: dict[str, str], max_token_length: int = 75, shuffled: bool = False) -> list[str]:
    """The warnings about the captions said at the start of training (and by check-data): those cut at
    model.max_token_length (counted where the `tokenizer` is at hand), those written with weights."""
    cut = long_captions_line(tokenizer, captions, max_token_length, shuffled) if tokenizer is not None else None
    return [line for line in (cut, weighted_captions_line(captions)) if line]
