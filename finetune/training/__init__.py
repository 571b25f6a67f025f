"""The one training loop and what it steps through: the objective, the run object and its length, validation (grids and the
held-out loss), the weight average, a stop before non-finite weights are saved, the run's end."""
