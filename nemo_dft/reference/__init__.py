"""Reference log-probs for reference-based DFT: fingerprinted offline files and their scoring pass."""
