"""ControlNet's data and conditioning: image/conditioning pairs, conditioning makers and records, ControlNet folders."""
