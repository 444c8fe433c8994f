"""Convert Mistral/Llama checkpoints between Hugging Face and NeMo 2, and verify them.

Run ``python scripts/convert_hf.py --help``; the implementation is in ``nemo_dft.convert``.
"""

from __future__ import annotations

from nemo_dft.convert.cli import main

# The guard matters: NeMo's distributed-checkpoint save starts a worker process that re-imports
# this module, which must not start a second conversion.
if __name__ == "__main__":
    from nemo_dft.platform.exit import exit_after_cleanup

    exit_after_cleanup(main())  # without the 3 s teardown of NeMo's modules (nemo_dft/platform/exit.py)
