"""Training: the NeMo model subclass with the DFT step, its loss reduction, the u table, metrics,
preemption, the checkpointing strategy with RNG state, and the training entry point (train.py)."""
