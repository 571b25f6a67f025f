"""The training examples of a data config for a test: as a run reads them (`finetune.data_check.check.checked_examples`, the
one path training takes), or with `check=False` without decoding the images (captions still required)."""

from finetune.captions.captions import missing_caption_message
from finetune.config import DataConfig
from finetune.data.epoch_uses import expand_repeats
from finetune.data.sources import Example, read_examples
from finetune.data_check.check import checked_examples
from finetune.errors import FinetuneError


def load_examples(config: DataConfig, check: bool = True) -> list[Example]:
    """The examples, each listed `repeats` times; with `check`, every image decoded and checked first (stopping on a bad
    one, or skipping it with data.skip_bad_images)."""
    if check:
        return checked_examples(config)[0]
    examples = read_examples(config)
    for example in examples:
        if example.caption is None:
            raise FinetuneError(missing_caption_message(example.source))
    return expand_repeats(examples)
