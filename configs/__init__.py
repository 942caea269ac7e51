"""Hydra config tree, shipped inside the package as `seg.configs` (see pyproject.toml)."""
