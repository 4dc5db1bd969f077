"""The docs match the tree: every file a doc cites exists, and the README's layout table names
every module of the agent and of the development tools."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# A backticked path into the project's own folders, optionally followed by `::name`.
CITED = re.compile(
    r"`((?:agent|azaion_loader_dev|tests|bench|scripts|systemd|packaging|docs|\.ci)"
    r"/[A-Za-z0-9_./-]+)`"
)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_cited_file_exists(doc: Path) -> None:
    text = doc.read_text()
    cited = set(CITED.findall(text))
    # Markdown links to files of the project, too.
    cited |= {link for link in re.findall(r"\]\(([^)#:]+)\)", text) if not link.startswith("http")}
    missing = sorted(
        path for path in cited if not (REPO / path).exists() and not (doc.parent / path).exists()
    )
    assert missing == [], f"{doc.name} cites files that do not exist: {missing}"


def test_readme_layout_names_every_agent_module() -> None:
    text = (REPO / "README.md").read_text()
    layout = text[text.index("## Layout") :]
    modules = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "agent").glob("*.py"))
    unnamed = [m for m in modules if m != "agent/__init__.py" and m != "agent/__main__.py"
               and f"`{m}`" not in layout]  # fmt: skip
    assert unnamed == [], f"README's Layout table does not name {unnamed}"


def test_readme_layout_names_every_development_module() -> None:
    """Each module of azaion_loader_dev/ by its path, or in the row of its folder by its name."""
    text = (REPO / "README.md").read_text()
    rows = text[text.index("## Layout") :].splitlines()
    unnamed = []
    for path in sorted((REPO / "azaion_loader_dev").rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        module = path.relative_to(REPO).as_posix()
        folder = f"`{path.parent.relative_to(REPO).as_posix()}/`"
        named = any(
            f"`{module}`" in row or (row.startswith(f"| {folder}") and f"`{path.name}`" in row)
            for row in rows
        )
        if not named:
            unnamed.append(module)
    assert unnamed == [], f"README's Layout table does not name {unnamed}"
