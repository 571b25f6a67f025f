"""Training data: where images come from, how they are read, cut, masked, bucketed, batched, ordered and cached. (The sample
datasets under `datasets/` are the toy world's: finetune/toyworld/sample_data.py.)"""
