"""Several processes: DDP and DeepSpeed settings, how a launch is read, how processes join and report errors, and
clean stops agreed on by every process."""
