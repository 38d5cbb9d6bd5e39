"""The README is the front door and docs/ the reference: every key, command, flag and metric stays
documented there, and every link between the pages resolves."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re
import typing
from pathlib import Path

from lorad import config

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
README_MAX_BYTES = 16_000


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _sections(cls, prefix: str = ""):
    """(section path, its keys) for a settings dataclass and the sections nested in it."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        kind = hints[f.name]
        inner = typing.get_args(kind)[0] if typing.get_origin(kind) is tuple else kind
        if dataclasses.is_dataclass(inner):
            yield from _sections(inner, f"{prefix}{f.name}.")
        else:
            keys.append(f.name)
    if prefix:
        yield prefix.rstrip("."), keys


def test_every_config_key_is_in_the_configuration_page():
    """Each key of each section (the dataclass walk of test_config, from config.Settings down) appears
    as `key` in docs/configuration.md, and each section has a heading there."""
    text = (DOCS / "configuration.md").read_text()
    sections = dict(_sections(config.Settings))
    assert {"daemon", "store", "store.sources", "training", "publish", "metrics", "logging"} <= set(sections)
    missing = [f"{section}.{key}" for section, keys in sections.items() for key in keys if f"`{key}`" not in text]
    assert not missing, f"config keys not documented as `key` in docs/configuration.md: {missing}"
    headings = [line for line in text.split("\n") if line.startswith("#")]
    untitled = [s for s in sections if not any(f"[{s}]" in h for h in headings)]
    assert not untitled, f"config sections without a heading naming [section] in docs/configuration.md: {untitled}"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    from lorad.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_command_is_in_the_operations_page():
    """Each subcommand build_parser() registers appears in docs/operations.md as `lorad <name>`."""
    text = (DOCS / "operations.md").read_text()
    commands = _subcommands()
    assert {"serve", "status", "train", "export", "export-adapter"} <= set(commands)
    missing = [name for name in commands if not re.search(rf"`lorad {re.escape(name)}[` ]", text)]
    assert not missing, f"commands not documented as `lorad <name>` in docs/operations.md: {missing}"


def test_every_command_flag_is_on_its_command_line_in_the_operations_page():
    """Each long option of a subcommand is on a line of docs/operations.md that names `lorad <name>`
    (--config and --json, which every command takes, are stated once)."""
    lines = (DOCS / "operations.md").read_text().split("\n")
    missing = []
    for name, sub in _subcommands().items():
        own = [line for line in lines if re.search(rf"`lorad {re.escape(name)}[` ]", line)]
        for action in sub._actions:
            for flag in action.option_strings:
                if (
                    flag.startswith("--")
                    and flag not in ("--help", "--config", "--json")
                    and not any(re.search(rf"{re.escape(flag)}\b", line) for line in own)
                ):
                    missing.append(f"lorad {name} {flag}")
    assert not missing, f"flags not on their command's line in docs/operations.md: {missing}"
    common = "\n".join(lines)
    assert "`--config PATH`" in common and "`--json`" in common


def _exposed_metrics() -> set[str]:
    """The names src/lorad/daemon/metrics.py exposes: counters gain _total and info metrics _info."""
    source = Path(importlib.util.find_spec("lorad.daemon.metrics").origin).read_text()
    names = set()
    # (a family's name may be on the line before its metric's: ruff format splits long calls)
    for m in re.finditer(r'(?:(\w*MetricFamily)[(,]\s*)?"(lorad_[a-z0-9_]+)"', source):
        family, name = m.groups()
        suffix = {"CounterMetricFamily": "_total", "InfoMetricFamily": "_info"}.get(family or "", "")
        names.add(name + suffix)
    return names


def test_every_metric_is_in_the_metrics_page():
    """Each lorad_* metric the daemon exposes is named in docs/metrics.md, and the page names no other."""
    text = (DOCS / "metrics.md").read_text()
    exposed = _exposed_metrics()
    assert {"lorad_jobs_total", "lorad_active_version_info", "lorad_buffer_artifacts"} <= exposed
    missing = sorted(n for n in exposed if not re.search(rf"(?<!\w){n}(?!\w)", text))
    assert not missing, f"metrics not documented in docs/metrics.md: {missing}"
    documented = {re.sub(r"_(sum|count)$", "", n) for n in re.findall(r"`(lorad_[a-z0-9_]+)", text)}
    stale = sorted(documented - exposed)
    assert not stale, f"docs/metrics.md names metrics the daemon does not expose: {stale}"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: its text lowercased, punctuation but - and _ dropped,
    spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def _outside_code(text: str, blank_code: bool = True):
    """The lines of a markdown file outside fenced code blocks (inline code blanked, so a link
    inside it is not read as one)."""
    fenced = False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield re.sub(r"`[^`]*`", "CODE", line) if blank_code else line


def _anchors(page: Path) -> set[str]:
    """The anchors of a page's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    found, seen = set(), {}
    for line in _outside_code(page.read_text(), blank_code=False):
        m = re.match(r"#{1,6}\s+(.*?)[\s#]*$", line)
        if m:
            anchor = github_anchor(m.group(1))
            n = seen.get(anchor, 0)
            found.add(anchor if n == 0 else f"{anchor}-{n}")
            seen[anchor] = n + 1
    return found


def _links(page: Path):
    """The targets of a page's markdown links, outside code."""
    for line in _outside_code(page.read_text()):
        yield from re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line)


def test_every_relative_link_resolves():
    """Each relative link in README.md and docs/*.md names a file that exists and, with #anchor, a
    heading of that file."""
    broken = []
    for page in _pages():
        for target in _links(page):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{where}: no heading with that anchor in {dest.name}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_github_anchor_follows_githubs_rules():
    assert github_anchor("Ingest and the buffer") == "ingest-and-the-buffer"
    assert github_anchor("Set-up") == "set-up"
    assert github_anchor("GGUF adapters for llama.cpp and Ollama") == "gguf-adapters-for-llamacpp-and-ollama"
    assert github_anchor("`[[store.sources]]`") == "storesources"
    assert github_anchor("max_file_bytes, the rest") == "max_file_bytes-the-rest"


def test_readme_is_the_front_door():
    """The README stays short, keeps the two commands CI greps for, and links every docs/ page."""
    readme = (ROOT / "README.md").read_text()
    size = len(readme.encode())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; the reference belongs in docs/"
    assert "make demo" in readme and "make test" in readme
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _links(ROOT / "README.md")}
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
