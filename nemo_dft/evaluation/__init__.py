"""Evaluating a trained model: greedy-generation accuracy with a named answer extraction, and the
ranking accuracy and log-probabilities of positives against negatives, scored with the training
tokenization (``scripts/evaluate.py``); and the lm-eval-harness command of the paper's benchmarks
(``scripts/lm_eval.py``)."""
