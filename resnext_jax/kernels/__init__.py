"""Hand-written kernels for what XLA runs slowly; one folder per platform."""
