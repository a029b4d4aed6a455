"""The layers of docs/DESIGN.md hold: every module of khala_cli sits in exactly one layer of
the table, and no module imports from a layer above its own (read from the imports, the lazy
ones inside functions too)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "khala_cli"


def layer_table() -> list[tuple[str, list[str]]]:
    """(layer, [paths]) bottom to top, from the `## Layers` table of DESIGN.md: the paths
    are the backticked `khala_cli/...` names of its modules column (a folder ends in /)."""
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    section = text[text.index("## Layers"):]
    section = section[:section.index("\n## ", 1)]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or cells[0] in ("layer", "") or set(cells[0]) <= {"-"}:
            continue
        rows.append((cells[0], re.findall(r"`(khala_cli/[^`]*)`", cells[1])))
    return rows


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def rank_of(path: Path, table: list[tuple[str, list[str]]]) -> list[int]:
    rel = path.relative_to(ROOT).as_posix()
    return [i for i, (_, paths) in enumerate(table)
            for p in paths if rel == p or (p.endswith("/") and rel.startswith(p))]


def imported(path: Path) -> set[str]:
    """The khala_cli modules a file imports, anywhere in it."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("khala_cli")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("khala_cli"):
                out.add(node.module)
                # `from khala_cli.x import y` may name a module y
                out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_every_module_is_in_exactly_one_layer():
    table = layer_table()
    assert len(table) >= 8, table
    placed = {name: rank_of(p, table) for name, p in modules().items()}
    assert {n: r for n, r in placed.items() if len(r) != 1} == {}


def test_no_module_imports_from_a_layer_above_its_own():
    table = layer_table()
    mods = modules()
    rank = {name: r[0] for name, p in mods.items() if len(r := rank_of(p, table)) == 1}
    upward = []
    for name, path in mods.items():
        if name not in rank:
            continue  # the test above names it
        for target in sorted(imported(path)):
            if target in rank and rank[target] > rank[name]:
                upward.append(f"{name} ({table[rank[name]][0]}) imports {target} "
                              f"({table[rank[target]][0]})")
    assert upward == []


def test_the_check_sees_an_upward_import(tmp_path):
    # the reader above finds imports inside functions too, as the lazy ones are
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from khala_cli.cli import steps\n    import khala_cli.runner\n")
    assert {"khala_cli.cli", "khala_cli.cli.steps", "khala_cli.runner"} <= imported(f)
