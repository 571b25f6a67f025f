"""Turning models into pictures: pipelines, samplers, prompts and their options, grids, and `finetune sample`."""
