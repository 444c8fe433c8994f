"""Build the stub ``pulp`` wheel that scripts/gpu_kit.sh carries instead of PuLP.

NeMo's ``nemo.collections.llm.api`` imports its distillation code, which imports modelopt, which
imports ``pulp`` at module level for a search that DFT never runs.  PuLP's wheel (16 MB, with solver
binaries) would break the kit's size limit, so this stub stands in: importing it and naming its
attributes work (modelopt's annotations do), instantiating any raises ImportError naming the kit.

    python scripts/gpu_kit_pulp_stub.py DIR
"""

from __future__ import annotations

import base64
import hashlib
import sys
import zipfile
from pathlib import Path

NAME = "pulp-0.0.0+gpukitstub"
FILES = {
    # Any name is a class (modelopt's annotations name pulp.LpVariable at import) that refuses use.
    "pulp/__init__.py": (
        '"""Stub carried by scripts/gpu_kit.sh: modelopt imports pulp, DFT never calls it."""\n\n\n'
        "class _Stub:\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        raise ImportError(f'pulp.{type(self).__name__}: the GPU kit carries a stub of PuLP "
        "(scripts/gpu_kit.sh)')\n\n\n"
        "def __getattr__(attr):\n"
        "    if attr.startswith('__'):\n"
        "        raise AttributeError(attr)\n"
        "    return type(attr, (_Stub,), {})\n"),
    f"{NAME}.dist-info/METADATA": "Metadata-Version: 2.1\nName: pulp\nVersion: 0.0.0+gpukitstub\n",
    f"{NAME}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: gpu_kit\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}


def _digest(text: str) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()


def build(directory: Path) -> Path:
    files = dict(FILES)
    record = "".join(f"{path},{_digest(text)},{len(text.encode())}\n" for path, text in files.items())
    files[f"{NAME}.dist-info/RECORD"] = record + f"{NAME}.dist-info/RECORD,,\n"
    path = directory / f"{NAME}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)
    return path


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
