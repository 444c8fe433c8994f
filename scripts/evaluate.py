"""Evaluate a model: greedy-generation accuracy, ranking accuracy of positives over negatives, and
mean log-probabilities, with the training tokenization.

    python scripts/evaluate.py --model PATH --data FILE [--out results.json] [key=value ...]

Run ``python scripts/evaluate.py --help`` for the settings; the implementation is in
``nemo_dft.evaluation``.
"""

from __future__ import annotations

from nemo_dft.evaluation.cli import main

if __name__ == "__main__":  # NeMo's checkpoint loading may start workers that re-import this module
    from nemo_dft.platform.exit import exit_after_cleanup

    exit_after_cleanup(main())  # without the 3 s teardown of NeMo's modules (nemo_dft/platform/exit.py)
