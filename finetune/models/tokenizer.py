"""A CLIP tokenizer built from a generated vocabulary, so tiny models need nothing from the hub.

CLIP's tokenizer is byte-level BPE: a word is split into characters (the last one marked `</w>`) and
merged pair by pair following `merges.txt`. We start from CLIP's 256 byte symbols (plain and
end-of-word), then add, for every known word, the left-to-right merges that rebuild it. Most known words
become one token; any other text still encodes, character by character.

Known limit: BPE applies the lowest-ranked merge anywhere in a word first, so a longer word's merge can
take a pair a shorter word needs for its own first merges. Three known words split that way: "striped"
(s|tri|pe|d: "triangle" ranks "t r" before "striped"'s "s t"), "diamond" (dia|mo|n|d) and "photo"
(p|ho|to). The shipped base (`finetune/assets/toyworld-base`) was pretrained with this vocabulary, its
text encoder reads "diamond" as those four tokens, and `make base-model` rebuilds it from this code: a
vocabulary that kept them whole would need the base retrained, so the split stays (tests pin it).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# Words a creator's captions commonly use, on top of the toy world's own words.
COMMON_WORDS = (
    "a an the of on in with and at by for to photo picture painting drawing style image of sks "
    "dog cat person man woman face portrait toy car house tree flower sky sea water mountain city "
    "shape object background left right top bottom center middle small large big tiny "
    "red green blue yellow purple orange white black gray grey pink brown cyan "
    "circle square triangle star diamond cross striped solid dotted pattern"
).split()


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode symbols."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def build_vocabulary(words: list[str] | tuple[str, ...]) -> tuple[dict[str, int], list[str]]:
    """Return (vocab, merges) covering every byte plus one token for each word in `words`."""
    symbols = list(_bytes_to_unicode().values())
    vocab_tokens = symbols + [symbol + "</w>" for symbol in symbols]
    merges: list[str] = []
    seen_merges: set[str] = set()
    # Longer words first: their merges get lower ranks, so short words inside them rarely split them
    # (a short word whose first pair a longer word merges otherwise does split: see the module's note).
    for word in sorted({w.lower() for w in words if w}, key=lambda w: (-len(w), w)):
        pieces = [_bytes_to_unicode()[b] for b in word.encode("utf-8")]
        pieces[-1] += "</w>"
        merged = pieces[0]
        for piece in pieces[1:]:
            rule = f"{merged} {piece}"
            merged = merged + piece
            if rule not in seen_merges:
                seen_merges.add(rule)
                merges.append(rule)
                vocab_tokens.append(merged)
    vocab: dict[str, int] = {}
    for token in vocab_tokens:
        vocab.setdefault(token, len(vocab))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return vocab, merges


def make_clip_tokenizer(words: list[str] | tuple[str, ...], folder: Path) -> CLIPTokenizer:
    """Write vocab.json/merges.txt for `words` into `folder` and load them as a CLIPTokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocabulary(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")  # Windows would write its code page
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    # from_pretrained reads vocab.json/merges.txt in both the slow (transformers 4) and the
    # tokenizers-backed (transformers 5) CLIPTokenizer.
    tokenizer = CLIPTokenizer.from_pretrained(
        folder,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=77,  # CLIP's: 75 tokens between the start and end tokens
    )
    tokenizer.save_pretrained(folder)
    return tokenizer
