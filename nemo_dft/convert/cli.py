"""Command line of ``scripts/convert_hf.py``: import, export and verify.

Parsing and input checks happen before NeMo is imported, so ``--help`` and bad arguments answer
at once.  Exit status: 0 success, 1 verification above tolerance, 2 unusable input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nemo_dft.convert.arch import ARCH_CHOICES
from nemo_dft.convert.errors import ConversionError

# Default tolerances: same stored dtype on both sides (only kernel differences remain), or
# different ones (e.g. a bf16 export of an fp32 checkpoint: weight rounding shows in the logits).
ATOL_SAME_DTYPE = 1e-3
ATOL_CROSS_DTYPE = 5e-2

DESCRIPTION = """\
Convert Mistral, Llama (2, 3.x), Qwen2/2.5 and Qwen3 checkpoints between Hugging Face and NeMo 2,
exactly, and verify them.

  import   HF directory or Hub id  ->  NeMo 2 checkpoint directory (context/ + weights/)
  export   NeMo 2 checkpoint (any llm.GPTModel subclass, e.g. a DFT run, saved at any TP/PP)
           ->  HF directory with tokenizer and chat template, loadable by transformers and vLLM;
           a LoRA run's adapters are merged into the weights, or with --adapter written as an
           HF PEFT adapter (adapter_config.json, adapter_model.safetensors) for its base model
  verify   load an HF and a NeMo checkpoint, compare logits on a few prompts (rendered with the
           chat template) and random tokens in fp32, print the maximum absolute difference

Runs on CPU (no GPU needed); on a machine without a GPU the CPU compatibility shim is enabled.
"""

EPILOG = """\
examples:
  python scripts/convert_hf.py import --hf mistralai/Mistral-7B-v0.1 --revision REV --out ckpt/mistral-nemo
  python scripts/convert_hf.py export --nemo runs/dft/ckpt --out hf/dft-mistral --dtype bf16 --verify
  python scripts/convert_hf.py verify --hf hf/dft-mistral --nemo runs/dft/ckpt
  python scripts/convert_hf.py export --nemo runs/lora/ckpt --out hf/lora-adapter --adapter --base-model hf/base

exit status: 0 success, 1 verification above --atol, 2 unusable input (message names file and key)
"""


def _add_verify_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompt",
        action="append",
        dest="prompts",
        metavar="TEXT",
        help="prompt to compare logits on (repeatable; default: three built-in prompts)",
    )
    parser.add_argument("--random", type=int, default=2, help="random token sequences to add (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random sequences (default: 0)")
    parser.add_argument(
        "--atol",
        type=float,
        help=f"fail (exit 1) when the max abs logit difference exceeds this (default: {ATOL_SAME_DTYPE:g} "
        f"when both sides store the same dtype, else {ATOL_CROSS_DTYPE:g}); logits are computed in fp32; "
        "exact conversions of the tiny models differ by < 1e-6, their bf16 exports by about 6e-3",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (no NeMo import)."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="convert_hf.py", description=DESCRIPTION, epilog=EPILOG, formatter_class=formatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{import,export,verify}")

    imp = commands.add_parser(
        "import", help="HF -> NeMo 2", description=DESCRIPTION, formatter_class=formatter
    )
    imp.add_argument(
        "--hf", required=True, metavar="PATH_OR_ID", help="HF checkpoint directory or Hub model id"
    )
    imp.add_argument("--out", required=True, type=Path, metavar="NEMO_DIR", help="NeMo 2 checkpoint to write")
    imp.add_argument(
        "--arch",
        choices=ARCH_CHOICES,
        default="auto",
        help="architecture; auto reads model_type from config.json, an explicit value is checked against it",
    )
    imp.add_argument("--revision", help="Hub revision (commit, tag or branch) when --hf is a Hub id")
    imp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    imp.add_argument(
        "--verify", action="store_true", help="compare logits of the result with --hf afterwards"
    )
    _add_verify_options(imp)

    exp = commands.add_parser(
        "export", help="NeMo 2 -> HF", description=DESCRIPTION, formatter_class=formatter
    )
    exp.add_argument(
        "--nemo", required=True, type=Path, metavar="NEMO_DIR", help="NeMo 2 checkpoint directory"
    )
    exp.add_argument("--out", required=True, type=Path, metavar="HF_DIR", help="HF directory to write")
    exp.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        help="dtype of the written weights (default: the checkpoint's parameter dtype)",
    )
    exp.add_argument(
        "--arch",
        choices=ARCH_CHOICES,
        default="auto",
        help="HF layout to write; auto takes it from the checkpoint's config class (MistralConfig7B, "
        "LlamaConfig, Qwen2Config or Qwen3Config); needed for a plain GPTConfig",
    )
    exp.add_argument(
        "--tokenizer",
        type=Path,
        metavar="DIR",
        help="HF tokenizer directory to ship instead of the one stored in the checkpoint",
    )
    exp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    exp.add_argument(
        "--adapter",
        action="store_true",
        help="LoRA runs: write the adapters in the HF PEFT layout (adapter_config.json, "
        "adapter_model.safetensors) instead of merged full weights",
    )
    exp.add_argument(
        "--base-model",
        metavar="HF_DIR_OR_ID",
        help="with --adapter: the base_model_name_or_path to record (the HF export of the run's model.init_from)",
    )
    exp.add_argument(
        "--verify", action="store_true", help="compare logits of the result with --nemo afterwards"
    )
    _add_verify_options(exp)

    ver = commands.add_parser(
        "verify", help="compare HF and NeMo logits", description=DESCRIPTION, formatter_class=formatter
    )
    ver.add_argument("--hf", required=True, type=Path, metavar="HF_DIR", help="HF checkpoint directory")
    ver.add_argument(
        "--nemo", required=True, type=Path, metavar="NEMO_DIR", help="NeMo 2 checkpoint directory"
    )
    _add_verify_options(ver)
    return parser


def _verify(hf: Path | str, nemo: Path | str, args: argparse.Namespace) -> int:
    from nemo_dft.convert.api import verify

    prompts = tuple(args.prompts) if args.prompts else None
    result = verify(hf, nemo, prompts=prompts, random=args.random, seed=args.seed)
    hf_dtype, nemo_dtype = result.stored_dtypes
    print(f"verify {hf} ({hf_dtype}) vs {nemo} ({nemo_dtype}), logits in fp32:")
    print(result.summary())
    atol = args.atol
    if atol is None:
        atol = ATOL_SAME_DTYPE if result.same_stored_dtype else ATOL_CROSS_DTYPE
    if result.max_abs_diff > atol:
        print(f"FAILED: max abs logit diff {result.max_abs_diff:.3e} > atol {atol:g}", file=sys.stderr)
        return 1
    print(f"OK: max abs logit diff {result.max_abs_diff:.3e} <= atol {atol:g}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Execute a parsed command; raises ConversionError on unusable input."""
    from nemo_dft.convert import api

    if args.command == "import":
        out = api.import_hf(
            args.hf, args.out, arch=args.arch, overwrite=args.overwrite, revision=args.revision
        )
        return _verify(api.resolve_hf_source(args.hf, args.revision), out, args) if args.verify else 0
    if args.command == "export" and args.adapter:
        from nemo_dft.convert.peft_export import export_adapter

        if args.verify:
            raise ConversionError("--verify compares full HF models; verify an adapter on its base in Python "
                                  "(nemo_dft.convert.peft_export.load_hf_with_adapter)")
        export_adapter(args.nemo, args.out, dtype=api.parse_dtype(args.dtype), overwrite=args.overwrite,
                       base_model=args.base_model)
        return 0
    if args.command == "export":
        out = api.export_hf(
            args.nemo,
            args.out,
            dtype=args.dtype,
            arch=args.arch,
            overwrite=args.overwrite,
            tokenizer=args.tokenizer,
        )
        return _verify(out, args.nemo, args) if args.verify else 0
    return _verify(args.hf, args.nemo, args)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
