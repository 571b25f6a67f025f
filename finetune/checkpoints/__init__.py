"""Checkpoints: written atomically, checked before a resume (DeepSpeed's CPU Adam brought to their step), the earlier run
in an output_dir, one run at a time there, and the run files other commands are pointed at."""
