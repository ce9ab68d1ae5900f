"""Import layering, read from the source (imports inside functions included, which a
``sys.modules`` check after import would miss): the weights module sits below both of its users,
``raymim.export`` and ``raymim.downstream``, which never import each other; ``raymim.io``'s
modules import each other in one direction only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "raymim"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every raymim module ``path`` imports, at any depth of its code (``from a import b`` counts
    ``a.b`` too, since ``b`` may be a submodule)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m == "raymim" or m.startswith("raymim.")}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_imports_of_sees_imports_inside_functions():
    # The checks below are only as good as this parser: export/commands.py imports raymim.weights
    # only inside functions (export_checkpoint, check_exportable, ...).
    assert "raymim.weights" in imports_of(PACKAGE / "export" / "commands.py")
    assert "raymim.weights.load_encoder" in imports_of(PACKAGE / "export" / "bundle.py")


def _within(modules: set[str], package: str) -> set[str]:
    return {m for m in modules if m == package or m.startswith(package + ".")}


@pytest.mark.parametrize("user, other", [("raymim.export", "raymim.downstream"),
                                         ("raymim.downstream", "raymim.export")])
def test_export_and_downstream_do_not_import_each_other(user, other):
    offenders = {mod: sorted(_within(deps, other)) for mod, deps in graph().items()
                 if _within({mod}, user) and _within(deps, other)}
    assert offenders == {}, f"{user} must reach {other}'s needs through raymim.weights: {offenders}"


def test_weights_is_below_both_users():
    deps = graph()["raymim.weights"]
    assert _within(deps, "raymim.export") == set() and _within(deps, "raymim.downstream") == set()
    users = {mod for mod, d in graph().items() if "raymim.weights" in d}
    assert _within(users, "raymim.export") and _within(users, "raymim.downstream")


def test_io_modules_import_in_one_direction():
    io = {m: _within(d, "raymim.io") - {m} for m, d in graph().items() if m.startswith("raymim.io.")}
    cycles = sorted((a, b) for a, deps in io.items() for b in deps if b in io and a in io[b] and a < b)
    assert cycles == [], f"raymim.io modules import each other: {cycles}"
    assert "raymim.io.readers" not in io["raymim.io.dicom"]
