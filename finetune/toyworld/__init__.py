"""The toy world: captioned 64x64 shape images, an exact evaluator, and metrics.

- :mod:`finetune.toyworld.world`: scenes, captions, rendering;
- :mod:`finetune.toyworld.datasets`: rendered samples and dataset folders;
- :mod:`finetune.toyworld.sample_data`: `finetune make-sample-data` (the shipped `datasets/`) and `make-world-data`;
- :mod:`finetune.toyworld.classifier`: a small CNN that recognises every attribute;
- :mod:`finetune.toyworld.metrics`: prompt adherence, subject fidelity, prior drift,
  control IoU and a Fréchet distance on the classifier's features;
- :mod:`finetune.toyworld.prompt_sets`: the fixed prompt sets `finetune eval` scores.
"""
