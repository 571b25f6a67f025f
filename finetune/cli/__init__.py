"""The `finetune` command: its arguments, its handlers, what `finetune train` checks before torch loads, and how a stop is said."""
