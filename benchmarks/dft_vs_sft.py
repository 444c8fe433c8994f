"""DFT vs SFT on a procedurally generated arithmetic task: the paper's MetaMath experiment in miniature.

    python benchmarks/dft_vs_sft.py [--quick] [--regime paper|sft-base] [--out DIR] [--threads N]

Two regimes (fixed before any held-out score was seen; ``--regime``):

- ``paper`` (default), the paper's own: a base that was only pre-trained, on a generic corpus of the
  task's facts that never shows its question/answer layout (nemo_dft/demo/arithmetic_corpus.py),
  with a plain language-model objective over whole documents; negatives sampled from that base with
  the paper's raw MetaMath prompt ("### Question: {query}\n\n### Response: ", no template); every
  method trained and evaluated with MetaMath's alpaca template;
- ``sft-base``, the ablation of the first version of this benchmark: a base trained with the SFT
  objective on the task's own format, negatives through its chat template.

Every stage runs one of the project's own commands as a subprocess, and is skipped when its output
exists, so an interrupted run resumes where it stopped:

1. data: fine-tuning, validation and held-out splits (nemo_dft/demo/arithmetic_task.py), the
   base's training text, and a BPE tokenizer trained on the task's text;
2. base: a tiny Mistral-shaped model trained from scratch (scripts/train_dft.py dft.objective=sft),
   exported to HF (scripts/convert_hf.py export);
3. negatives: m x epochs samples per fine-tuning prompt from the base model (temperature 0.7,
   top-k 50, top-p 1.0; scripts/generate_negatives.py backend=hf in shards, then
   scripts/merge_negatives.py), the same with verifier filtering (filter.exclude_correct, for
   dft_filtered), and m per held-out prompt for the ranking accuracy; the base is scored on the
   held-out split (scripts/evaluate.py);
4. learning rate: for each method (sft; dft with tau 1.0, gamma 0.85 and the frozen base as
   reference; dft2 with tau 0.3, gamma 0.9; dft_filtered, dft on the filtered negatives) one run
   per learning rate of the grid from the base, same steps, batch and schedule, scored on the
   validation split; a best rate at an edge of the grid extends the grid one half-decade past that
   edge (up to ``max_extensions`` times); the choice is written to lr_choice.json before any
   fine-tuned model sees the held-out split;
5. seeds: every method at its learning rate with each seed (data order), scored on the held-out
   split (greedy accuracy, ranking accuracy), intermediate checkpoints of the first seed too;
6. report: results.json, results.md and heldout_accuracy.png in DIR.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
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
from nemo_dft.demo import arithmetic_corpus, arithmetic_task  # noqa: E402
from nemo_dft.evaluation.extraction import is_correct  # noqa: E402

DFT_SETTINGS = ["dft.objective=dft", "dft.tau=1.0", "dft.gamma=0.85", "dft.reference=frozen"]
METHODS = {  # the paper's settings; dft scores negatives against the frozen initial (base) weights
    "sft": ["dft.objective=sft", "dft.num_negatives=0"],
    "dft": DFT_SETTINGS,
    "dft2": ["dft.objective=dft2", "dft.tau=0.3", "dft.gamma=0.9"],
    "dft_filtered": DFT_SETTINGS,  # on the verifier-filtered negatives
}
# The paper's MetaMath generation prompt (generator/gen.py of the paper's code): no chat template.
PAPER_GENERATION_PROMPT = "### Question: {query}\n\n### Response: "
# dft_filtered's verifier: the base writes free text, so the last number it states is its answer.
FILTER = {"exclude_correct": True, "extract": "number", "on_short": "keep"}
REGIMES = ("paper", "sft-base")


@dataclass(frozen=True)
class Protocol:
    """Sizes of one benchmark run; fixed before anything is scored."""

    regime: str = "paper"
    pretrain: int = 11200  # sft-base: problems in the base's SFT split (also fixes the other splits' draw)
    corpus_problems: int = 64000  # paper: problems whose facts the pre-training corpus states
    finetune: int = 768
    validation: int = 200
    heldout: int = 500
    base_steps: int = 700  # sft-base; the paper regime trains one epoch of its corpus
    base_lr: float = 3e-3
    batch: int = 16  # prompts per optimizer step, base and fine-tuning alike
    num_negatives: int = 2  # m
    epochs: int = 3  # fine-tuning epochs (the published MetaMath DFT models'): m x epochs negatives per prompt
    lr_grid: tuple[float, ...] = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3)  # two decades in half-decade steps
    max_extensions: int = 2  # per method and edge: how far the grid may grow past a best rate at its edge
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    curve_points: int = 3  # checkpoints per fine-tuning run scored for the curve (the last included)
    max_new_tokens: int = 48
    max_length: int = 112
    max_prompt_length: int = 64
    data_seed: int = 0
    generation_shards: int = 2  # fine-tuning negatives: generated in shards, then merged (as on a cluster)
    max_resample_rounds: int = 3  # dft_filtered: extra sampling rounds for prompts short of incorrect samples
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

    @property
    def template(self) -> str | None:
        """The training and evaluation template: alpaca in the paper regime, the tokenizer's own else."""
        return "alpaca" if self.regime == "paper" else None


FULL = Protocol()
QUICK = Protocol(pretrain=160, corpus_problems=480, finetune=32, validation=16, heldout=24, base_steps=20, batch=8,
                 epochs=1, lr_grid=(3e-3,), max_extensions=0, seeds=(0,), curve_points=1, max_new_tokens=40,
                 generation_shards=1, max_resample_rounds=1)


def protocol_for(regime: str, quick: bool) -> Protocol:
    from dataclasses import replace

    return replace(QUICK if quick else FULL, regime=regime)


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


def neighbour_rate(lr: float, direction: int) -> float:
    """The next rate of the half-decade sequence (..., 1e-4, 3e-4, 1e-3, ...) above (+1) or below (-1)."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = lr / 10**exponent
    ladder = [(1.0, exponent), (3.0, exponent)]
    index = 0 if mantissa < 2 else 1
    step = index + direction
    mantissa, exponent = (ladder[step % 2][0], exponent + step // 2)
    return float(f"{mantissa:g}e{exponent}")


def best_rate(scores: dict[float, float | None]) -> float:
    """Highest validation accuracy (a missing accuracy counts as 0); a tie goes to the smaller rate."""
    return max(scores, key=lambda lr: (scores[lr] or 0.0, -lr))


def bracketed_choice(score: Callable[[float], float | None], grid: tuple[float, ...],
                     max_extensions: int) -> tuple[float, dict[float, float | None], list[str]]:
    """(chosen rate, every rate's score, the extensions made): the grid is scored, and while the best
    rate is its smallest or largest, one more rate past that edge is scored (at most
    ``max_extensions`` per edge)."""
    if len(grid) == 1 and max_extensions == 0:  # nothing to choose between (--quick): no run is scored
        return grid[0], {grid[0]: None}, []
    scores = {lr: score(lr) for lr in sorted(grid)}
    extensions: list[str] = []
    grown = {-1: 0, 1: 0}
    while True:
        best = best_rate(scores)
        rates = sorted(scores)
        edge = -1 if best == rates[0] else 1 if best == rates[-1] else 0
        if edge == 0 or grown[edge] >= max_extensions:
            return best, scores, extensions
        new = neighbour_rate(rates[0] if edge < 0 else rates[-1], edge)
        grown[edge] += 1
        extensions.append(f"{best:g} at the {'lower' if edge < 0 else 'upper'} edge: added {new:g}")
        scores[new] = score(new)


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
        if self.p.regime == "paper":
            self.make_corpus()
        log(f"data: {sizes} problems in {self.data}; tokenizer {self.tokenizer}")

    def make_corpus(self) -> None:
        """The base's pre-training documents (none about a fine-tuning, validation or held-out
        question), cut to whole batches, and a copy of the tokenizer that renders a row as a document."""
        corpus = self.data / "corpus.jsonl"
        if not corpus.is_file():
            exclude = {r["real"][0]["content"] for split in ("finetune", "validation", "heldout")
                       for r in read_rows(self.data / f"{split}.jsonl")}
            rows = arithmetic_corpus.corpus_rows(self.p.corpus_problems, self.p.data_seed, exclude)
            rows = rows[: len(rows) // self.p.batch * self.p.batch]
            for row in rows:
                phrase = arithmetic_corpus.forbidden_in(row["real"][-1]["content"])
                if phrase is not None:
                    raise StageError(f"{corpus}: document {row['id']} contains {phrase!r}")
            write_text_atomic(corpus, "".join(json.dumps(r) + "\n" for r in rows))
        documents = self.out / "document-tokenizer"
        if not (documents / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer))
            tokenizer.chat_template = arithmetic_corpus.DOCUMENT_TEMPLATE
            staging = documents.with_name(documents.name + ".tmp")
            shutil.rmtree(staging, ignore_errors=True)
            tokenizer.save_pretrained(str(staging))
            staging.replace(documents)

    # -- helpers ---------------------------------------------------------------------------------
    def _common(self) -> list[str]:
        overrides = [f"tokenizer.path={self.tokenizer}", "data.eval_path=null", "trainer.progress_bar=false",
                     f"model.micro_batch_size={self.p.batch}", f"model.global_batch_size={self.p.batch}",
                     f"data.max_length={self.p.max_length}", f"data.max_prompt_length={self.p.max_prompt_length}",
                     "log.tensorboard=false", f"data.add_bos={str(self.p.add_bos).lower()}"]
        if self.p.template is not None:
            overrides.append(f"tokenizer.chat_template={self.p.template}")
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
            template = [] if self.p.template is None else [f"chat_template={self.p.template}"]
            self.run.script(name, "evaluate.py", "--model", str(model), "--data", str(data), "--out", str(out),
                            "extract=answer_is", f"max_new_tokens={self.p.max_new_tokens}", "batch_size=64",
                            f"num_threads={self.threads}", "progress=false", "backend=hf",
                            f"max_length={self.p.max_length}", f"max_prompt_length={self.p.max_prompt_length}",
                            f"add_bos={str(self.p.add_bos).lower()}", *template)
        result = json.loads(out.read_text())
        summary = result.get("summary", result)
        if summary["accuracy"] is None and summary.get("n_extracted") == 0:
            summary["accuracy"] = 0.0  # no answer found in any generation: none is right, for the comparison
        log(f"  {name}: accuracy {summary['accuracy']:.3f}"
            + (f", rank_acc {summary['rank_acc']:.3f}" if summary.get("rank_acc") is not None else "")
            + f" (n={summary['n']})")
        return summary

    def generate(self, name: str, model: Path, data: Path, out_dir: Path, samples: int, shards: int,
                 filtered: bool = False) -> Path:
        merged = out_dir / "negatives.parquet"
        if merged.is_file():
            return merged
        # One thread: the tiny model's sampling is latency-bound, and two OpenMP threads on a busy
        # 2-core machine spin (measured 0.45 s against 5 to 9 s per prompt under a load of 4).
        common = ["backend=hf", f"model.path={model}", f"data.input={data}", "data.format.messages_field=real",
                  "data.format.id_field=id", "prompt.system_message=null", f"sampling.n={samples}",
                  "sampling.temperature=0.7", "sampling.top_k=50", "sampling.top_p=1.0",
                  f"sampling.max_new_tokens={self.p.max_new_tokens}", "hf.num_threads=1",
                  f"output.dir={out_dir}", f"shard.count={shards}", f"prompt.add_bos={str(self.p.add_bos).lower()}"]
        if filtered:
            common += [f"filter.{k}={str(v).lower()}" for k, v in FILTER.items()]
            common.append(f"sampling.max_resample_rounds={self.p.max_resample_rounds}")
        config: list[str] = []
        if self.p.regime == "paper":  # the prompt holds '#' and newlines: a config file, not an override
            settings = self.out / "generation-prompt.yaml"
            if not settings.is_file():
                write_text_atomic(settings, json.dumps({"prompt": {"style": "template",
                                                                   "template": PAPER_GENERATION_PROMPT}}) + "\n")
            config = ["--config", str(settings)]
        if shards == 1:  # generation merges its one shard itself (shard.index=null)
            self.run.script(f"{name}-shard0", "generate_negatives.py", *config, *common, "shard.index=null")
            return merged
        for index in range(shards):
            self.run.script(f"{name}-shard{index}", "generate_negatives.py", *config, *common, f"shard.index={index}")
        self.run.script(f"{name}-merge", "merge_negatives.py", f"output.dir={out_dir}", f"shard.count={shards}")
        return merged

    # -- stage 2 -------------------------------------------------------------------------------
    def base(self) -> tuple[Path, Path]:
        p = self.p
        if p.regime == "paper":
            corpus = self.data / "corpus.jsonl"
            steps = sum(1 for _ in corpus.open()) // p.batch
            log(f"base: pre-training from random init on the generic corpus, {steps} steps x {p.batch} documents "
                "(one epoch; language-model loss over whole documents)")
            last = self.train("base-train", self.out / "base", steps, [
                "dft.objective=sft", "dft.num_negatives=0", f"data.path={corpus}", "data.num_epochs=1",
                f"tokenizer.path={self.out / 'document-tokenizer'}", "tokenizer.chat_template=null",
                f"optim.lr={p.base_lr}", f"optim.min_lr={p.base_lr / 10}", "run.seed=0"])
        else:
            log(f"base: SFT from random init, {p.base_steps} steps x {p.batch} prompts on the pre-training split")
            last = self.train("base-train", self.out / "base", p.base_steps, [
                "dft.objective=sft", "dft.num_negatives=0", f"data.path={self.data / 'pretrain.jsonl'}",
                "data.num_epochs=1", f"optim.lr={p.base_lr}", f"optim.min_lr={p.base_lr / 10}", "run.seed=0"])
        hf_dir = self.out / "base" / "hf"
        if not (hf_dir / "config.json").is_file():
            self.run.script("base-export", "convert_hf.py", "export", "--nemo", str(last), "--out", str(hf_dir))
        return last, hf_dir

    # -- stage 3 -------------------------------------------------------------------------------
    def negatives(self, hf_dir: Path) -> tuple[dict[str, Path], dict]:
        p = self.p
        samples = p.num_negatives * p.epochs
        prompt = "the raw prompt " + repr(PAPER_GENERATION_PROMPT) if p.regime == "paper" else "its chat template"
        log(f"negatives: {samples} samples per fine-tuning prompt, {p.num_negatives} per held-out prompt "
            f"(temperature 0.7, top-k 50, top-p 1.0; {prompt})")
        files = {
            "finetune": self.generate("neg-finetune", hf_dir, self.data / "finetune.jsonl", self.out / "neg-finetune",
                                      samples, p.generation_shards),
            "finetune_filtered": self.generate("neg-filtered", hf_dir, self.data / "finetune.jsonl",
                                               self.out / "neg-filtered", samples, p.generation_shards,
                                               filtered=True),
            "heldout": self.generate("neg-heldout", hf_dir, self.data / "heldout.jsonl", self.out / "neg-heldout",
                                     p.num_negatives, 1),
        }
        quality = {split: negative_quality(path) for split, path in files.items()}
        quality["finetune_filtered"]["filter"] = filter_counts(files["finetune_filtered"])
        for split in ("finetune", "heldout"):
            q = quality[split]
            log(f"  {split} negatives: correct final answer {q['correct_share']:.3f}, last number correct "
                f"{q['number_correct_share']:.3f}, correct number anywhere {q['contains_answer_share']:.3f}, "
                f"identical to the reference {q['identical_share']:.3f}")
        return files, quality

    def arithmetic_probe(self, hf_dir: Path) -> dict:
        """Can the base do the task's arithmetic in the corpus's own form?  Each held-out problem's
        setup followed by "Now NAME has", greedily completed: the share whose first number is the
        answer, for one- and two-step problems.  Only the paper regime's base is asked (the other
        base was trained on the task's format, which its held-out accuracy measures)."""
        path = self.out / "base-arithmetic-probe.json"  # eval/ holds scripts/evaluate.py's outputs only
        if path.is_file():
            return json.loads(path.read_text())
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(self.threads)
        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
        right = {"one_step": [0, 0], "two_step": [0, 0]}
        for row in read_rows(self.data / "heldout.jsonl"):
            question, answer = row["real"][0]["content"], row["real"][1]["content"]
            setup, asked = question.rsplit(" How many", 1)
            name = asked.split(" does ", 1)[1].split(" have", 1)[0]
            ids = tokenizer(f"{tokenizer.eos_token}{setup} Now {name} has", return_tensors="pt",
                            add_special_tokens=False).input_ids
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                                     pad_token_id=tokenizer.eos_token_id)
            numbers = re.findall(r"\d+", tokenizer.decode(out[0, ids.shape[1]:]))
            kind = "two_step" if setup.count(".") == 3 else "one_step"
            right[kind][0] += bool(numbers) and numbers[0] == arithmetic_task.extract_answer(answer)
            right[kind][1] += 1
        probe = {kind: {"accuracy": hits / total if total else None, "n": total}
                 for kind, (hits, total) in right.items()}
        write_text_atomic(path, json.dumps(probe, indent=2) + "\n")
        log("  base arithmetic in the corpus's form (setup + 'Now NAME has', greedy): "
            + ", ".join(f"{k} {v['accuracy']:.3f} (n={v['n']})" for k, v in probe.items() if v["n"]))
        return probe

    # -- stages 4 and 5 ------------------------------------------------------------------------
    def finetune(self, method: str, lr: float, seed: int, base: Path, negatives: dict[str, Path]) -> Path:
        p = self.p
        every = max(p.finetune_steps // p.curve_points, 1)
        run_dir = self.out / "runs" / f"{method}-lr{lr:g}-seed{seed}"
        data = negatives["finetune_filtered" if method == "dft_filtered" else "finetune"]
        return self.train(f"{method}-lr{lr:g}-seed{seed}", run_dir, p.finetune_steps, [
            *METHODS[method], f"data.path={data}", f"model.init_from={base}", "model.preset=checkpoint",
            f"data.num_epochs={p.epochs}", f"optim.lr={lr}", f"optim.min_lr={lr / 10}", f"run.seed={seed}",
            f"checkpoint.every_n_steps={every}", "data.empty_answers=keep",
            *([] if method == "sft" else [f"dft.num_negatives={p.num_negatives}"])])

    def choose_lr(self, base: Path, negatives: dict[str, Path]) -> dict:
        path = self.out / "lr_choice.json"
        if path.is_file():  # chosen once: a resumed run never chooses again
            return json.loads(path.read_text())
        seed = self.p.seeds[0]

        def validation_score(method: str, lr: float) -> float | None:
            last = self.finetune(method, lr, seed, base, negatives)
            return self.evaluate(f"{method}-lr{lr:g}-validation", last, self.data / "validation.jsonl",
                                 self.out / "eval" / f"{method}-lr{lr:g}-seed{seed}-validation.json")["accuracy"]

        choice: dict[str, float] = {}
        scores: dict[str, dict[str, float | None]] = {}
        extensions: dict[str, list[str]] = {}
        for method in METHODS:
            best, by_rate, grown = bracketed_choice(lambda lr, m=method: validation_score(m, lr), self.p.lr_grid,
                                                    self.p.max_extensions)
            choice[method] = best
            scores[method] = {f"{lr:g}": by_rate[lr] for lr in sorted(by_rate)}
            extensions[method] = grown
            rates = sorted(by_rate)
            inside = rates[0] < best < rates[-1]
            log(f"  {method}: lr {best:g} ({'inside' if inside else 'at an edge of'} {[f'{r:g}' for r in rates]})")
        record = {"lr": choice, "validation_accuracy": scores, "seed": seed, "extensions": extensions,
                  "chosen_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "grid": list(self.p.lr_grid)}
        write_text_atomic(path, json.dumps(record, indent=2) + "\n")
        log(f"learning rates chosen on the validation split (written to {path}): {choice}")
        return record

    def seeds(self, lr_choice: dict, base: Path, negatives: dict[str, Path]) -> dict:
        methods: dict[str, dict] = {}
        heldout = negatives["heldout"]
        for method in METHODS:
            lr = lr_choice["lr"][method]
            entry: dict = {"lr": lr, "seeds": list(self.p.seeds), "heldout_accuracy": [], "rank_acc": [],
                           "rank_acc_sum": [], "training": [], "curve": []}
            for seed in self.p.seeds:
                last = self.finetune(method, lr, seed, base, negatives)
                run_dir = last.parent.parent
                summary = self.evaluate(f"{method}-seed{seed}-heldout", last, heldout,
                                        self.out / "eval" / f"{method}-lr{lr:g}-seed{seed}-heldout.json")
                entry["heldout_accuracy"].append(summary["accuracy"])
                entry["rank_acc"].append(summary["rank_acc"])
                entry["rank_acc_sum"].append(summary.get("rank_acc_sum"))
                entry["training"].append(training_stats(run_dir / "metrics.jsonl"))
                if seed == self.p.seeds[0]:
                    entry["curve"] = self.curve(method, lr, seed, run_dir, heldout, summary["accuracy"])
                    entry["trajectory"] = trajectory(run_dir / "metrics.jsonl")
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
        base, hf_dir = self.base()
        negatives, quality = self.negatives(hf_dir)
        # the base under the fine-tuning template: its greedy accuracy and its ranking of the held-out pairs
        base_summary = self.evaluate("base-heldout", base, negatives["heldout"],
                                     self.out / "eval" / "base-heldout.json")
        probe = self.arithmetic_probe(hf_dir) if self.p.regime == "paper" else None
        lr_choice = self.choose_lr(base, negatives)
        methods = self.seeds(lr_choice, base, negatives)
        results = {
            "methods": methods,
            "base": {"heldout_accuracy": base_summary["accuracy"], "rank_acc": base_summary.get("rank_acc"),
                     "steps": int(base.name.split("=")[1].split("-")[0])},
            "regime": {"name": self.p.regime, "base_heldout_accuracy": base_summary["accuracy"],
                       "template": self.p.template or "the tokenizer's own (zephyr)",
                       "generation_prompt": PAPER_GENERATION_PROMPT if self.p.regime == "paper"
                       else "the base's chat template",
                       "negatives_correct_share": quality["finetune"]["correct_share"],
                       "negatives_identical_share": quality["finetune"]["identical_share"],
                       "negatives_contain_answer_share": quality["finetune"]["contains_answer_share"],
                       "base_arithmetic_probe": probe},
            "negatives": quality,
            "lr_choice": lr_choice,
            "lr_grid": lr_choice["validation_accuracy"],
            "dft_filtered": {"filter": FILTER, "max_resample_rounds": self.p.max_resample_rounds,
                             "negatives": quality["finetune_filtered"], **{k: methods["dft_filtered"].get(k) for k in (
                                 "lr", "heldout_accuracy_mean", "heldout_accuracy_std", "rank_acc_mean")}},
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
    """How often the base model's samples are right: share with the reference's final answer ("The
    answer is: N"), share whose last number is the answer (the verifier dft_filtered uses), share
    that states the answer anywhere, share identical to the reference, share with no answer phrase."""
    total = correct = number_correct = contains = identical = unanswered = 0
    for row in read_rows(path):
        reference = row["real"][-1]["content"]
        truth = arithmetic_task.extract_answer(reference)
        for key in sorted(k for k in row if k.startswith("generated_")):
            text = row[key][-1]["content"]
            answer = arithmetic_task.extract_answer(text)
            total += 1
            correct += answer is not None and answer == truth
            number_correct += is_correct(text, reference, "number")
            contains += truth is not None and truth in re.findall(r"\d+", text)  # as a whole number
            identical += text.strip() == reference.strip()
            unanswered += answer is None

    def share(count: int) -> float | None:
        return count / total if total else None

    return {"samples": total, "prompts": sum(1 for _ in read_rows(path)), "correct_share": share(correct),
            "number_correct_share": share(number_correct), "contains_answer_share": share(contains),
            "identical_share": share(identical), "unanswered_share": share(unanswered)}


def filter_counts(path: Path) -> dict:
    """The verifier filter's counts from the merged file's metadata (scripts/merge_negatives.py)."""
    import pyarrow.parquet as pq

    from nemo_dft.generation.shards import METADATA_KEY

    meta = json.loads(pq.read_schema(path).metadata[METADATA_KEY.encode()])
    keys = ("samples", "filtered_correct", "filter_rounds", "prompts_short", "prompts_dropped")
    return {k: meta["counts"].get(k) for k in keys}


def trajectory(metrics: Path, points: int = 24) -> list[dict]:
    """About ``points`` evenly spaced steps of a run: loss, u, weights and the log-probabilities."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    every = max(len(rows) // points, 1)
    keys = ("step", "loss", "u_mean", "weight_mean", "pos_logps", "neg_logps", "rank_acc")
    return [{k: r.get(k) for k in keys} for r in rows[::every] + ([rows[-1]] if (len(rows) - 1) % every else [])]


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
    parser.add_argument("--regime", choices=REGIMES, default="paper",
                        help="paper (default): a pre-trained-only base and the paper's raw generation prompt; "
                             "sft-base: the ablation whose base was trained on the task's own format")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default runs/dft_vs_sft[-sft-base][-quick]); "
                             "rerunning with the same directory skips the stages already done")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per subprocess (default 1: two OpenMP threads per process spin, 10-30x "
                             "slower, when anything else runs on a 2-core machine)")
    parser.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming")
    args = parser.parse_args(argv)
    protocol = protocol_for(args.regime, args.quick)
    name = "dft_vs_sft" + ("-sft-base" if args.regime == "sft-base" else "") + ("-quick" if args.quick else "")
    out = (args.out or REPO / "runs" / name).resolve()
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
    log(f"{'quick' if args.quick else 'full'} run of the {protocol.regime} regime in {out}: "
        f"{protocol.finetune_steps} fine-tuning steps per run, {len(protocol.lr_grid)} learning rate(s) x "
        f"{len(METHODS)} methods (grid extended at an edge up to {protocol.max_extensions} times), "
        f"seeds {list(protocol.seeds)}")
    try:
        Benchmark(out, protocol, args.threads)()
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
