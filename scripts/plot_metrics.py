"""Plot the training curves of one or more DFT runs into one PNG.

usage: plot_metrics.py RUN_DIR [RUN_DIR ...] [--out FILE.png]

A run is a training run.dir (metrics.jsonl, and eval.jsonl or tensorboard/ for the held-out
evaluations), optionally named: NAME=RUN_DIR (default: the directory's name).  Panels: loss;
positive and negative log-probs and their margin; u mean; weight mean; training and held-out
ranking accuracy; learning rate; gradient norm; throughput.  Several runs are overlaid, e.g.
  plot_metrics.py DFT=runs/dft DFT2=runs/dft2 --out dft-vs-dft2.png

Exit codes: 0 written, 2 a run that cannot be read (the message names the file and line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    description, epilog = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directory, or NAME=RUN_DIR")
    parser.add_argument("--out", metavar="FILE.png", help="output file (default: <first RUN_DIR>/metrics.png)")
    args = parser.parse_args(argv)
    from nemo_dft.training.plots import RunReadError, plot_runs, read_run

    try:
        runs = [read_run(spec) for spec in args.runs]
    except RunReadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.runs[0].rpartition("=")[2]) / "metrics.png"
    figure = plot_runs(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80)
    print(f"wrote {out} ({len(runs)} run(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
