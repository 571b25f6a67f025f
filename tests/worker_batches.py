"""What a data-loader worker makes of a micro-batch, importable without the test modules (and so without the trainer's
libraries): tests/test_spawned_workers.py runs it in a spawned process, which imports this module to call it."""


def first_batch(dataset, keys, collate_fn):
    return collate_fn([dataset[key] for key in keys])


MODEL_LIBRARIES = ("diffusers", "transformers", "peft", "bitsandbytes", "accelerate", "deepspeed")


def model_libraries_loaded() -> list[str]:
    """The model stack's libraries this process has imported: a worker needs none of them to make batches."""
    import sys

    return [name for name in MODEL_LIBRARIES if name in sys.modules]
