"""Typed configs: the loader shared by every command (loading.py) and the training schema (training.py)."""
