"""The data check (`finetune check-data`, and `finetune train` before torch loads): every input read as training reads it."""
