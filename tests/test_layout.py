"""The package layout: stages do not import the stages above them, and nothing loose at the top."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nemo_dft"

# Beneath every stage: shared data handling, configs, platform glue, the demo assets, the objective.
FOUNDATION = {"data", "config", "platform", "demo", "objective"}
# What training and scoring both build from a config.
MODELING = {"modeling"}
STAGES = {"generation", "reference", "training", "convert", "evaluation"}
TOP_LEVEL_ALLOWED = {"__init__.py", "objective.py"}


def _part(module: str) -> str:
    """``nemo_dft.training.model`` -> ``training``."""
    return module.split(".")[1] if module.count(".") >= 1 else ""


def _imports(path: Path) -> list[tuple[str, bool]]:
    """Every ``nemo_dft.*`` module ``path`` imports, with whether the import is at module level."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "nemo_dft" else [f"nemo_dft.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found += [(n, id(node) in top_level) for n in names if n.startswith("nemo_dft.")]
    return found


def _modules() -> list[tuple[str, Path]]:
    return [(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts), p) for p in sorted(PACKAGE.rglob("*.py"))]


def test_no_loose_modules_at_the_top() -> None:
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert set(loose) <= TOP_LEVEL_ALLOWED, loose


def test_lower_layers_never_import_higher_ones() -> None:
    violations = []
    for module, path in _modules():
        here = _part(module)
        for imported, _ in _imports(path):
            there = _part(imported)
            if here in FOUNDATION | MODELING and there in STAGES:
                violations.append(f"{module} imports {imported}")
            if here in FOUNDATION and there in MODELING:
                violations.append(f"{module} imports {imported}")
            if here in STAGES - {"training"} and there == "training":
                violations.append(f"{module} imports {imported}")
    assert not violations, "\n".join(violations)


def test_cpu_shim_is_imported_only_where_a_cpu_run_asks_for_it() -> None:
    """GPU runs never touch the shim: no module imports it at module level."""
    importers = [(module, top) for module, path in _modules()
                 for imported, top in _imports(path) if imported == "nemo_dft.platform.cpu_shim"]
    assert importers, "the shim is imported somewhere (otherwise this test checks nothing)"
    assert not [m for m, top in importers if top], importers


def test_the_checker_sees_a_violation(tmp_path) -> None:
    """The import scan finds both module-level and function-level imports."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from nemo_dft.training.model import DFTModel\n\ndef f():\n    import nemo_dft.platform.cpu_shim\n"
    )
    assert _imports(sample) == [("nemo_dft.training.model", True), ("nemo_dft.platform.cpu_shim", False)]
