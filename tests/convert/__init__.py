"""Checkpoint conversion tests (issue 6)."""
