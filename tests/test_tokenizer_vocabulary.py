"""The generated CLIP vocabulary: which known words stay whole, and that the shipped base uses this vocabulary."""

from pathlib import Path

from transformers import CLIPTokenizer

from finetune.models.tiny_model import DEFAULT_WORDS
from finetune.models.tokenizer import make_clip_tokenizer
from finetune.toyworld.world import WORLD_WORDS

SHIPPED_TOKENIZER = Path(__file__).resolve().parent.parent / "finetune" / "assets" / "toyworld-base" / "tokenizer"
# BPE's merge order splits these (finetune/models/tokenizer.py's note): kept, as the shipped base learned them so.
SPLIT_WORDS = {"diamond": ["dia", "mo", "n", "d</w>"], "photo": ["p", "ho", "to</w>"], "striped": ["s", "tri", "pe", "d</w>"]}


def test_known_words_are_one_token_but_the_three_the_note_names(tmp_path):
    tokenizer = make_clip_tokenizer(DEFAULT_WORDS, tmp_path / "tokenizer")
    split = {word: tokenizer.tokenize(word) for word in DEFAULT_WORDS if len(tokenizer.tokenize(word)) > 1}
    assert split == SPLIT_WORDS
    assert set(split) & set(WORLD_WORDS) == {"diamond", "striped"}  # a held-in shape and the held-out style
    assert tokenizer.tokenize("a small red circle on a gray background, top left") == [
        "a</w>", "small</w>", "red</w>", "circle</w>", "on</w>", "a</w>", "gray</w>", "background</w>", ",</w>", "top</w>", "left</w>",
    ]  # fmt: skip


def test_the_shipped_base_tokenizer_is_the_generated_one(tmp_path):
    """The shipped base's text encoder learned this vocabulary's ids and splits: a change to the generator
    that keeps the three words whole needs the base retrained (make base-model) and this test updated."""
    generated = make_clip_tokenizer(DEFAULT_WORDS, tmp_path / "tokenizer")
    shipped = CLIPTokenizer.from_pretrained(SHIPPED_TOKENIZER)
    assert shipped.get_vocab() == generated.get_vocab()
    for word in DEFAULT_WORDS:
        assert shipped.tokenize(word) == generated.tokenize(word), word
