"""Training data: where images come from, how they are read, cut, masked, bucketed, batched, ordered and cached; the sample
datasets."""
