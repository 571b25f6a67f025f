"""Optimizers and learning-rate schedules, the packages they need, Prodigy over ZeRO's shards, and a LoRA's max-norm."""
