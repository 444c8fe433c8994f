"""Platform glue beneath every stage: the CPU-only shim and its model-config overrides (used only
by runs without a GPU), collectives over Megatron's groups, precision/FP8 settings, signals."""
