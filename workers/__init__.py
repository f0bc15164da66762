"""Ready-made worker apps built on meshjobs. Run one with ``meshjobs worker workers.demo:app``."""
