"""Sweeps: each file's `get_sweep()` names a config and its points; `python -m famjax.sweep` runs them."""
