"""Base models: where one is, loading and freezing it, the frozen encoders, the tiny models, the weights a run starts from,
and peft's LoRA layers as training runs them."""
