"""The `finetune` command: its arguments, its handlers, and what `finetune train` checks before torch loads."""
