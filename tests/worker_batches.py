"""What a data-loader worker makes of a micro-batch, importable without the test modules (and so without the trainer's
libraries): tests/test_spawned_workers.py runs it in a spawned process, which imports this module to call it."""


def first_batch(dataset, keys, collate_fn):
    return collate_fn([dataset[key] for key in keys])
