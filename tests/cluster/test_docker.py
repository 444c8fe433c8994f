"""The Docker images, checked without a Docker engine: hadolint, the pinned versions against the
project's own pins, the build context, and the entry point run with a stand-in python."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from .tools import REPO, assert_clean, bash_syntax_and_shellcheck, find_tool

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DOCKERFILES = [REPO / "Dockerfile", REPO / "Dockerfile.generation"]
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
# docker run IMAGE <command> -> the script it runs
COMMANDS = {
    "train": "scripts/train_dft.py",
    "precompute-ref": "scripts/precompute_ref_logps.py",
    "convert": "scripts/convert_hf.py",
    "generate": "scripts/generate_negatives.py",
    "merge": "scripts/merge_negatives.py",
}


def dockerfile_args(path: Path) -> dict[str, str]:
    """``ARG NAME=value`` defaults (quotes removed)."""
    args = {}
    for match in re.finditer(r"^ARG\s+(\w+)=(.*)$", path.read_text(), re.MULTILINE):
        args[match.group(1)] = match.group(2).strip().strip('"')
    return args


def exact_pin(requirements: list[str], name: str, source: str) -> str:
    """The ``==`` version of ``name`` among ``requirements``; fails naming ``source`` if there is none."""
    for line in requirements:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.name.lower().replace("_", "-") == name:
            pins = [spec.version for spec in req.specifier if spec.operator == "=="]
            assert len(pins) == 1, f"{source}: {line!r} is not an exact pin"
            return pins[0]
    pytest.fail(f"{source} pins no {name}")


def make_variable(text: str, name: str) -> str:
    match = re.search(rf"^{name}\s*[:?]?=\s*(.*)$", text, re.MULTILINE)
    assert match, f"mk/generation.mk defines no {name}"
    return match.group(1).strip()


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path: Path) -> None:
    assert_clean([find_tool("hadolint"), str(path)])


def test_training_image_pins_agree_with_the_project() -> None:
    args = dockerfile_args(REPO / "Dockerfile")
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    constraints = (REPO / "requirements/constraints.txt").read_text().splitlines()
    expected = {
        "NEMO_VERSION": [("pyproject.toml", exact_pin(dependencies, "nemo-toolkit", "pyproject.toml"))],
        "MCORE_VERSION": [
            ("pyproject.toml", exact_pin(dependencies, "megatron-core", "pyproject.toml")),
            ("requirements/constraints.txt", exact_pin(constraints, "megatron-core", "requirements/constraints.txt")),
        ],
    }
    for arg, sources in expected.items():
        for source, version in sources:
            assert args.get(arg) == version, f"Dockerfile ARG {arg}={args.get(arg)} but {source} pins {version}"


def test_training_image_installs_what_the_pins_name() -> None:
    """The ARGs are what pip installs, under the project's constraints, as the Makefile does."""
    text = (REPO / "Dockerfile").read_text()
    assert '"nemo-toolkit[nlp]==${NEMO_VERSION}"' in text
    assert '"megatron-core==${MCORE_VERSION}"' in text
    makefile = (REPO / "Makefile").read_text()
    stamp_rule = re.search(r"^\$\(STAMP\):(.*)$", makefile, re.MULTILINE)
    assert stamp_rule, "Makefile has no $(STAMP) rule"
    for requirement_file in re.findall(r"requirements/\S+", stamp_rule.group(1)):
        assert requirement_file in text, f"the Makefile's environment uses {requirement_file}, the Dockerfile does not"


def test_generation_image_agrees_with_the_generation_environment() -> None:
    args = dockerfile_args(REPO / "Dockerfile.generation")
    mk = (REPO / "mk/generation.mk").read_text()
    vllm = exact_pin([make_variable(mk, "VLLM_GPU_SPEC")], "vllm", "mk/generation.mk VLLM_GPU_SPEC")
    assert args.get("VLLM_VERSION") == vllm, f"Dockerfile.generation ARG VLLM_VERSION={args.get('VLLM_VERSION')} " \
                                             f"but mk/generation.mk VLLM_GPU_SPEC pins {vllm}"  # fmt: skip
    assert re.search(r"^FROM vllm/vllm-openai:v\$\{VLLM_VERSION\}$", (REPO / "Dockerfile.generation").read_text(),
                     re.MULTILINE)  # fmt: skip
    test_only = {"pytest"}
    wanted = {Requirement(item.strip('"')).name for item in make_variable(mk, "GEN_EXTRA").split()} - test_only
    assert set(args.get("GEN_EXTRA", "").split()) == wanted, "Dockerfile.generation GEN_EXTRA != mk/generation.mk"


def test_generation_slurm_template_uses_the_same_vllm() -> None:
    mk = (REPO / "mk/generation.mk").read_text()
    vllm = exact_pin([make_variable(mk, "VLLM_GPU_SPEC")], "vllm", "mk/generation.mk VLLM_GPU_SPEC")
    image = re.search(r'CONTAINER_IMAGE:=([^}"]+)', (REPO / "slurm/generate_negatives.sh").read_text())
    assert image and image.group(1) == f"vllm/vllm-openai:v{vllm}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoint_and_workdir(path: Path) -> None:
    text = path.read_text()
    workdir = re.findall(r"^WORKDIR (\S+)$", text, re.MULTILINE)[-1]
    assert re.search(rf'^ENTRYPOINT \["{re.escape(workdir)}/docker/entrypoint.sh"\]$', text, re.MULTILINE)
    assert re.search(r"^COPY \. \.$", text, re.MULTILINE)  # the checkout lands in WORKDIR


def test_build_context_leaves_out_environments_and_outputs() -> None:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]  # fmt: skip
    for excluded in (".git", ".venv*", "build", "runs"):
        assert excluded in patterns
    for needed in ("nemo_dft", "scripts", "conf", "requirements", "docker", "pyproject.toml", "README.md"):
        assert not any(Path(needed).match(pattern) for pattern in patterns), f".dockerignore drops {needed}"


def test_entrypoint_lint() -> None:
    bash_syntax_and_shellcheck(ENTRYPOINT)


@pytest.fixture
def stub_python(tmp_path: Path) -> Path:
    """A ``python`` that writes its arguments, NUL-separated, to $RECORD."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text('#!/usr/bin/env bash\nprintf \'%s\\0\' "$@" > "$RECORD"\n')
    (bin_dir / "python").chmod(0o755)
    return tmp_path


def run_entrypoint(stub: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str] | None]:
    record = stub / "argv"
    # PYTHON=python: the stand-in on PATH (as in the training image, which has no .venv/)
    env = {"PATH": f"{stub / 'bin'}:/usr/bin:/bin", "RECORD": str(record), "HOME": str(stub), "PYTHON": "python"}
    proc = subprocess.run(["bash", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=30)
    argv = record.read_text().split("\0")[:-1] if record.exists() else None
    return proc, argv


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_entrypoint_maps_commands_to_scripts(stub_python: Path, command: str) -> None:
    args = ["--config", "conf/dft_mistral.yaml", "optim.lr=1e-6", "prompt.system_message=a 'quoted' text"]
    proc, argv = run_entrypoint(stub_python, command, *args)
    assert proc.returncode == 0, proc.stderr
    assert argv is not None, "python was not run"
    assert Path(argv[0]).resolve() == (REPO / COMMANDS[command]).resolve()
    assert argv[1:] == args


@pytest.mark.parametrize("args", [[], ["help"], ["--help"]])
def test_entrypoint_prints_help(stub_python: Path, args: list[str]) -> None:
    proc, argv = run_entrypoint(stub_python, *args)
    assert proc.returncode == 0 and argv is None
    for command, script in COMMANDS.items():
        assert re.search(rf"^\s+{re.escape(command)}\s+{re.escape(script)}\s", proc.stdout, re.MULTILINE), command


def test_entrypoint_runs_other_commands(stub_python: Path) -> None:
    proc, argv = run_entrypoint(stub_python, "echo", "hello", "world")
    assert proc.returncode == 0 and proc.stdout == "hello world\n" and argv is None
    proc, argv = run_entrypoint(stub_python, "python", "-c", "x")
    assert argv == ["-c", "x"]


def test_entrypoint_passes_the_exit_status_on(stub_python: Path) -> None:
    proc, _ = run_entrypoint(stub_python, "bash", "-c", "exit 75")
    assert proc.returncode == 75


def test_entrypoint_outside_docker_uses_the_checkouts_venv(tmp_path: Path) -> None:
    """Without PYTHON and with no environment on PATH, `train` runs with the checkout's .venv/."""
    assert (REPO / ".venv" / "bin" / "python").exists(), "make env creates .venv/"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(ENTRYPOINT), "train", "--help"], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Discriminative Fine-Tuning" in proc.stdout and "trainer.devices" in proc.stdout
