"""DFT vs SFT on a procedurally generated arithmetic task: the paper's MetaMath experiment in miniature.

    python benchmarks/dft_vs_sft.py [--quick] [--out DIR] [--threads N]

Every stage runs one of the project's own commands as a subprocess, and is skipped when its output
exists, so an interrupted run resumes where it stopped:

1. data: pre-training, fine-tuning, validation and held-out splits (nemo_dft/demo/arithmetic_task.py)
   and a BPE tokenizer trained on the task's text;
2. base: a tiny Mistral-shaped model trained from scratch with the SFT objective on the pre-training
   split (scripts/train_dft.py dft.objective=sft), exported to HF (scripts/convert_hf.py export) and
   scored on the held-out split (scripts/evaluate.py);
3. negatives: m x epochs samples per fine-tuning prompt from the base model (temperature 0.7, top-k
   50; scripts/generate_negatives.py backend=hf in shards, then scripts/merge_negatives.py), and m
   per held-out prompt for the ranking accuracy;
4. learning rate: for each method (sft; dft with tau 1.0, gamma 0.85 and the frozen base as
   reference; dft2 with tau 0.3, gamma 0.9) one run per learning rate of the grid from the base,
   same steps, batch and schedule, scored on the validation split; the best is written to
   lr_choice.json before any fine-tuned model sees the held-out split;
5. seeds: every method at its learning rate with each seed (data order), scored on the held-out
   split (greedy accuracy, ranking accuracy), intermediate checkpoints of the first seed too;
6. report: results.json, results.md and heldout_accuracy.png in DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nemo_dft.data.io import read_rows, write_text_atomic  # noqa: E402
from nemo_dft.demo import arithmetic_task  # noqa: E402

METHODS = {  # the paper's settings; dft scores negatives against the frozen initial (base) weights
    "sft": ["dft.objective=sft", "dft.num_negatives=0"],
    "dft": ["dft.objective=dft", "dft.tau=1.0", "dft.gamma=0.85", "dft.reference=frozen"],
    "dft2": ["dft.objective=dft2", "dft.tau=0.3", "dft.gamma=0.9"],
}


@dataclass(frozen=True)
class Protocol:
    """Sizes of one benchmark run; fixed before anything is scored."""

    pretrain: int = 11200
    finetune: int = 1024
    validation: int = 200
    heldout: int = 500
    base_steps: int = 700
    base_lr: float = 3e-3
    batch: int = 16  # prompts per optimizer step, base and fine-tuning alike
    num_negatives: int = 2  # m
    epochs: int = 2  # fine-tuning epochs: m x epochs negatives per prompt
    lr_grid: tuple[float, ...] = (1e-3, 3e-3)
    seeds: tuple[int, ...] = (0, 1, 2)
    curve_points: int = 2  # checkpoints per fine-tuning run scored for the curve (the last included)
    max_new_tokens: int = 48
    max_length: int = 112
    max_prompt_length: int = 64
    data_seed: int = 0
    # No BOS anywhere (data.add_bos, evaluate.py's add_bos and generation's prompt.add_bos alike).
    # Generation used to tokenize prompts with the tokenizer's own special tokens, and the task
    # tokenizer adds none, while training put a BOS first: a base trained with BOS then sampled
    # BOS-less prompts off its distribution (measured: 2 % of its samples right against 43 % greedy
    # accuracy).  Generation now follows training's rule (prompt.add_bos); the protocol keeps the
    # setting it was fixed with.
    add_bos: bool = False
    model_config: dict[str, int] = field(default_factory=dict)  # over the tiny preset

    @property
    def finetune_steps(self) -> int:
        return self.finetune * self.epochs // self.batch


FULL = Protocol()
QUICK = Protocol(pretrain=160, finetune=32, validation=16, heldout=24, base_steps=20, batch=8, epochs=1,
                 lr_grid=(3e-3,), seeds=(0,), curve_points=1, max_new_tokens=40)


class StageError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"[dft_vs_sft {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
        return sock.getsockname()[1]


class Runner:
    """Runs the project's scripts as subprocesses, one log file per stage."""

    def __init__(self, out: Path, threads: int, say: Callable[[str], None] | None = log) -> None:
        self.out = out
        self.threads = threads
        self.say = say  # prints the line that says a stage is done (None: nothing is printed)
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def script(self, name: str, script: str, *args: str, attempts: int = 3, python: str | None = None) -> float:
        """Run scripts/<script> with ``python`` (default: this interpreter), its output in
        OUT/logs/<name>.log; returns the seconds it took, raises StageError with the log's tail."""
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        # the repository first, then any PYTHONPATH given (scripts/gpu_kit.sh installs NeMo with --target)
        path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
        env.update(PYTHONPATH=path, OMP_NUM_THREADS=str(self.threads), MASTER_ADDR="127.0.0.1",
                   TOKENIZERS_PARALLELISM="false")
        command = [python or sys.executable, str(REPO / "scripts" / script), *args]
        log_path = self.out / "logs" / f"{name}.log"
        start = time.time()
        for _ in range(attempts):  # a rendezvous port taken between choosing and binding it: retry
            env["MASTER_PORT"] = str(_free_port())
            with open(log_path, "w", encoding="utf-8") as handle:
                handle.write(" ".join(command) + "\n")
                handle.flush()
                result = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
            if result.returncode == 0 or "EADDRINUSE" not in log_path.read_text(errors="replace"):
                break
        if result.returncode != 0:
            tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-25:])
            raise StageError(f"{name}: {script} exited {result.returncode}; log {log_path}:\n{tail}")
        seconds = time.time() - start
        if self.say:
            self.say(f"  {name}: done in {seconds:.0f} s")
        return seconds


class Benchmark:
    def __init__(self, out: Path, protocol: Protocol, threads: int) -> None:
        self.out = out
        self.p = protocol
        self.run = Runner(out, threads)
        self.threads = threads
        self.data = out / "data"
        self.tokenizer = out / "arithmetic-tokenizer"

    # -- stage 1 -------------------------------------------------------------------------------
    def make_data(self) -> None:
        sizes = {"pretrain": self.p.pretrain, "finetune": self.p.finetune, "validation": self.p.validation,
                 "heldout": self.p.heldout}
        if not all((self.data / f"{s}.jsonl").is_file() for s in sizes):
            arithmetic_task.write_splits(self.data, sizes, self.p.data_seed)
        arithmetic_task.task_tokenizer_dir(self.out)  # built once, as OUT/arithmetic-tokenizer
        log(f"data: {sizes} problems in {self.data}; tokenizer {self.tokenizer}")

    # -- helpers ---------------------------------------------------------------------------------
    def _common(self) -> list[str]:
        overrides = [f"tokenizer.path={self.tokenizer}", "data.eval_path=null", "trainer.progress_bar=false",
                     f"model.micro_batch_size={self.p.batch}", f"model.global_batch_size={self.p.batch}",
                     f"data.max_length={self.p.max_length}", f"data.max_prompt_length={self.p.max_prompt_length}",
                     "log.tensorboard=false", f"data.add_bos={str(self.p.add_bos).lower()}"]
        return overrides + [f"model.config.{k}={v}" for k, v in self.p.model_config.items()]

    @staticmethod
    def _last(run_dir: Path, steps: int) -> Path | None:
        last = run_dir / "checkpoints" / f"step={steps}-last"
        return last if (last / "weights").is_dir() else None

    def train(self, name: str, run_dir: Path, steps: int, overrides: list[str]) -> Path:
        if self._last(run_dir, steps) is None:
            self.run.script(name, "train_dft.py", f"run.dir={run_dir}", f"trainer.max_steps={steps}",
                            *self._common(), *overrides)
        last = self._last(run_dir, steps)
        if last is None:
            raise StageError(f"{name}: {run_dir} has no checkpoint step={steps}-last after training")
        return last

    def evaluate(self, name: str, model: Path, data: Path, out: Path) -> dict:
        if not out.is_file():
            self.run.script(name, "evaluate.py", "--model", str(model), "--data", str(data), "--out", str(out),
                            "extract=answer_is", f"max_new_tokens={self.p.max_new_tokens}", "batch_size=64",
                            f"num_threads={self.threads}", "progress=false", "backend=hf",
                            f"max_length={self.p.max_length}", f"max_prompt_length={self.p.max_prompt_length}",
                            f"add_bos={str(self.p.add_bos).lower()}")
        result = json.loads(out.read_text())
        summary = result.get("summary", result)
        if summary["accuracy"] is None and summary.get("n_extracted") == 0:
            summary["accuracy"] = 0.0  # no answer found in any generation: none is right, for the comparison
        log(f"  {name}: accuracy {summary['accuracy']:.3f}"
            + (f", rank_acc {summary['rank_acc']:.3f}" if summary.get("rank_acc") is not None else "")
            + f" (n={summary['n']})")
        return summary

    def generate(self, name: str, model: Path, data: Path, out_dir: Path, samples: int, shards: int) -> Path:
        merged = out_dir / "negatives.parquet"
        if merged.is_file():
            return merged
        common = ["backend=hf", f"model.path={model}", f"data.input={data}", "data.format.messages_field=real",
                  "data.format.id_field=id", "prompt.system_message=null", f"sampling.n={samples}",
                  "sampling.temperature=0.7", "sampling.top_k=50", f"sampling.max_new_tokens={self.p.max_new_tokens}",
                  f"hf.num_threads={self.threads}", f"output.dir={out_dir}", f"shard.count={shards}",
                  f"prompt.add_bos={str(self.p.add_bos).lower()}"]
        for index in range(shards):
            self.run.script(f"{name}-shard{index}", "generate_negatives.py", *common, f"shard.index={index}")
        self.run.script(f"{name}-merge", "merge_negatives.py", f"output.dir={out_dir}", f"shard.count={shards}")
        return merged

    # -- stage 2 -------------------------------------------------------------------------------
    def base(self) -> tuple[Path, Path, dict]:
        p = self.p
        log(f"base: SFT from random init, {p.base_steps} steps x {p.batch} prompts on the pre-training split")
        last = self.train("base-train", self.out / "base", p.base_steps, [
            "dft.objective=sft", "dft.num_negatives=0", f"data.path={self.data / 'pretrain.jsonl'}",
            "data.num_epochs=1", f"optim.lr={p.base_lr}", f"optim.min_lr={p.base_lr / 10}", "run.seed=0"])
        hf_dir = self.out / "base" / "hf"
        if not (hf_dir / "config.json").is_file():
            self.run.script("base-export", "convert_hf.py", "export", "--nemo", str(last), "--out", str(hf_dir))
        summary = self.evaluate("base-heldout", hf_dir, self.data / "heldout.jsonl",
                                self.out / "eval" / "base-heldout.json")
        return last, hf_dir, summary

    # -- stage 3 -------------------------------------------------------------------------------
    def negatives(self, hf_dir: Path) -> tuple[Path, Path, dict]:
        p = self.p
        samples = p.num_negatives * p.epochs
        log(f"negatives: {samples} samples per fine-tuning prompt, {p.num_negatives} per held-out prompt "
            "(temperature 0.7, top-k 50)")
        train = self.generate("neg-finetune", hf_dir, self.data / "finetune.jsonl", self.out / "neg-finetune",
                              samples, 2)
        heldout = self.generate("neg-heldout", hf_dir, self.data / "heldout.jsonl", self.out / "neg-heldout",
                                p.num_negatives, 1)
        quality = {"finetune": negative_quality(train), "heldout": negative_quality(heldout)}
        log(f"  share of negatives with the correct final answer: finetune {quality['finetune']['correct_share']:.3f}, "
            f"heldout {quality['heldout']['correct_share']:.3f}")
        return train, heldout, quality

    # -- stages 4 and 5 ------------------------------------------------------------------------
    def finetune(self, method: str, lr: float, seed: int, base: Path, train: Path) -> Path:
        p = self.p
        every = max(p.finetune_steps // p.curve_points, 1)
        run_dir = self.out / "runs" / f"{method}-lr{lr:g}-seed{seed}"
        return self.train(f"{method}-lr{lr:g}-seed{seed}", run_dir, p.finetune_steps, [
            *METHODS[method], f"data.path={train}", f"model.init_from={base}", "model.preset=checkpoint",
            f"data.num_epochs={p.epochs}", f"optim.lr={lr}", f"optim.min_lr={lr / 10}", f"run.seed={seed}",
            f"checkpoint.every_n_steps={every}", "data.empty_answers=keep",
            *([] if method == "sft" else [f"dft.num_negatives={p.num_negatives}"])])

    def choose_lr(self, base: Path, train: Path) -> dict:
        path = self.out / "lr_choice.json"
        if path.is_file():  # chosen once: a resumed run never chooses again
            return json.loads(path.read_text())
        seed = self.p.seeds[0]
        scores: dict[str, dict[str, float]] = {}
        for method in METHODS:
            scores[method] = {}
            for lr in self.p.lr_grid:
                last = self.finetune(method, lr, seed, base, train)
                summary = self.evaluate(f"{method}-lr{lr:g}-validation", last, self.data / "validation.jsonl",
                                        self.out / "eval" / f"{method}-lr{lr:g}-seed{seed}-validation.json")
                scores[method][f"{lr:g}"] = summary["accuracy"]
        # Highest validation accuracy; a tie goes to the smaller learning rate.
        choice = {m: float(max(s, key=lambda k: (s[k], -float(k)))) for m, s in scores.items()}
        record = {"lr": choice, "validation_accuracy": scores, "seed": seed,
                  "chosen_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "grid": list(self.p.lr_grid)}
        write_text_atomic(path, json.dumps(record, indent=2) + "\n")
        log(f"learning rates chosen on the validation split (written to {path}): {choice}")
        return record

    def seeds(self, lr_choice: dict, base: Path, train: Path, heldout: Path) -> dict:
        methods: dict[str, dict] = {}
        for method in METHODS:
            lr = lr_choice["lr"][method]
            entry: dict = {"lr": lr, "seeds": list(self.p.seeds), "heldout_accuracy": [], "rank_acc": [],
                           "rank_acc_sum": [], "training": [], "curve": []}
            for seed in self.p.seeds:
                last = self.finetune(method, lr, seed, base, train)
                run_dir = last.parent.parent
                summary = self.evaluate(f"{method}-seed{seed}-heldout", last, heldout,
                                        self.out / "eval" / f"{method}-lr{lr:g}-seed{seed}-heldout.json")
                entry["heldout_accuracy"].append(summary["accuracy"])
                entry["rank_acc"].append(summary["rank_acc"])
                entry["rank_acc_sum"].append(summary.get("rank_acc_sum"))
                entry["training"].append(training_stats(run_dir / "metrics.jsonl"))
                if seed == self.p.seeds[0]:
                    entry["curve"] = self.curve(method, lr, seed, run_dir, heldout, summary["accuracy"])
            entry.update(summarize(entry["heldout_accuracy"], "heldout_accuracy"))
            entry.update(summarize(entry["rank_acc"], "rank_acc"))
            methods[method] = entry
        return methods

    def curve(self, method: str, lr: float, seed: int, run_dir: Path, heldout: Path, final: float) -> list:
        """[[step, held-out accuracy], ...] over the run's intermediate checkpoints and its last."""
        points = []
        steps = sorted({int(c.name.split("=")[1].split("-")[0]) for c in (run_dir / "checkpoints").glob("step=*")
                        if (c / "weights").is_dir()})
        for step in steps:
            if step == self.p.finetune_steps:
                points.append([step, final])
                continue
            name = f"{method}-lr{lr:g}-seed{seed}-step{step}-heldout"
            summary = self.evaluate(name, run_dir / "checkpoints" / f"step={step}", heldout,
                                    self.out / "eval" / f"{name}.json")
            points.append([step, summary["accuracy"]])
        return points

    # -- all -------------------------------------------------------------------------------------
    def __call__(self) -> dict:
        start = time.time()
        self.make_data()
        base, hf_dir, base_summary = self.base()
        train, heldout, quality = self.negatives(hf_dir)
        lr_choice = self.choose_lr(base, train)
        methods = self.seeds(lr_choice, base, train, heldout)
        results = {
            "methods": methods,
            "base": {"heldout_accuracy": base_summary["accuracy"], "rank_acc": base_summary.get("rank_acc"),
                     "steps": self.p.base_steps},
            "negatives": quality,
            "lr_choice": lr_choice,
            "protocol": {**asdict(self.p), "finetune_steps": self.p.finetune_steps,
                         "methods": {m: " ".join(o) for m, o in METHODS.items()}},
            "seconds": round(time.time() - start, 1),
        }
        from benchmarks.dft_vs_sft_report import write_report

        write_report(self.out, results)
        log(f"done in {results['seconds']:.0f} s: {self.out / 'results.json'}, results.md, heldout_accuracy.png")
        return results


def summarize(values: list[float | None], key: str) -> dict:
    present = [v for v in values if v is not None]
    if not present:
        return {f"{key}_mean": None, f"{key}_std": None}
    return {f"{key}_mean": statistics.fmean(present),
            f"{key}_std": statistics.stdev(present) if len(present) > 1 else 0.0}


def negative_quality(path: Path) -> dict:
    """How often the base model's samples are right: share with the reference's final answer, share
    identical to the reference answer, share with no extractable answer."""
    total = correct = identical = unanswered = 0
    for row in read_rows(path):
        reference = row["real"][-1]["content"]
        truth = arithmetic_task.extract_answer(reference)
        for key in sorted(k for k in row if k.startswith("generated_")):
            text = row[key][-1]["content"]
            answer = arithmetic_task.extract_answer(text)
            total += 1
            correct += answer is not None and answer == truth
            identical += text.strip() == reference.strip()
            unanswered += answer is None

    def share(count: int) -> float | None:
        return count / total if total else None

    return {"samples": total, "correct_share": share(correct), "identical_share": share(identical),
            "unanswered_share": share(unanswered)}


def training_stats(metrics: Path) -> dict:
    """Means over the last quarter of a run's steps: loss, u, weights, log-probs, training rank_acc."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    tail = rows[-max(len(rows) // 4, 1):]
    stats = {"steps": rows[-1]["step"] if rows else 0}
    for key in ("loss", "u_mean", "weight_mean", "pos_logps", "neg_logps", "rank_acc"):
        values = [r[key] for r in tail if r.get(key) is not None]
        stats[key] = statistics.fmean(values) if values else None
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, 1 seed, one learning rate (minutes; for the tests)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default runs/dft_vs_sft, or runs/dft_vs_sft-quick with --quick); "
                             "rerunning with the same directory skips the stages already done")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per subprocess (default 2)")
    parser.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming")
    args = parser.parse_args(argv)
    protocol = QUICK if args.quick else FULL
    out = (args.out or REPO / "runs" / ("dft_vs_sft-quick" if args.quick else "dft_vs_sft")).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = out / "protocol.json"
    wanted = json.dumps(asdict(protocol), sort_keys=True)
    if settings.is_file() and json.dumps(json.loads(settings.read_text()), sort_keys=True) != wanted:
        print(f"error: {out} holds a run of another protocol ({settings}); use another --out or --fresh",
              file=sys.stderr)
        return 2
    write_text_atomic(settings, json.dumps(asdict(protocol), indent=2) + "\n")
    log(f"{'quick' if args.quick else 'full'} run in {out}: {protocol.finetune_steps} fine-tuning steps per run, "
        f"{len(protocol.lr_grid)} learning rate(s) x {len(METHODS)} methods, seeds {list(protocol.seeds)}")
    try:
        Benchmark(out, protocol, args.threads)()
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
