"""The method itself, pure: the positive-aware rules, top-k merging, losses, metrics (no Ray, no I/O)."""
