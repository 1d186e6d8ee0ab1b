"""Print the lowest versions pyproject.toml allows, one requirement per line
(``name>=X`` becomes ``name==X``), for the library's and the dashboard's
dependencies. torch is pinned to the CPU build on this machine's disk instead:
its floor (2.1.0) is PyPI's CUDA build, a 2.5 GB download, checked by hand
(DEVELOPERS.md, "torch and CI")."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

TORCH = "torch==2.13.0"


def main() -> None:
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"] + project["optional-dependencies"]["dashboard"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)", requirement)
        if match is None:
            sys.exit(f"floors.py: cannot read a floor from {requirement!r}")
        name, floor = match.groups()
        print(TORCH if name == "torch" else f"{name}=={floor}")


if __name__ == "__main__":
    main()
