"""docs/architecture.md draws the package layout: every module under src/lorad/ is in it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "lorad"


def drawn() -> set[str]:
    """``pkg/name.py`` (or ``name.py`` at the top) for every module the layout block names."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text[text.index("```\nsrc/lorad/") :]
    block = block[: block.index("\n```", 4)]
    names, package = set(), ""
    for line in block.splitlines()[2:]:
        head = re.match(r"^  (\w+)/", line)
        if head:
            package = head.group(1) + "/"
            names.add(package + "__init__.py")  # a package drawn is its face too
        elif re.match(r"^  \S", line):
            package = ""
        for name in re.findall(r"\b(\w+\.py)\b", line.split("  ")[2] if head else line):
            names.add(package + name)
    return names


def test_every_module_is_in_the_architecture_doc():
    modules = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py")}
    missing = sorted(modules - drawn())
    assert not missing, f"modules missing from docs/architecture.md's layout: {missing}"


def test_the_doc_draws_no_module_that_is_gone():
    modules = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py")}
    assert not sorted(drawn() - modules)
