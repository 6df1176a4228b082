"""The layout rules of the package, checked on the source (no import of the kernels, runs anywhere).

Rule: a ``_private`` name belongs to the module or package that defines it, and only code inside
that module or package may use it. ``sonic_learn.fast.routing`` may not take ``_helper`` from
``sonic_learn.fast.topk`` (a sibling module) nor ``_check`` from ``sonic_learn.reference.routing``
(another package); ``sonic_learn.fast.*`` may import ``sonic_learn.fast._cute`` (its own package's
private module) and every module may import ``sonic_learn._checks`` (the root package's). Shared
helpers live in public modules: ``sonic_learn.contracts`` and ``sonic_learn.fast.primitives``.

Checked for every module of ``sonic_learn/fast`` and ``sonic_learn/reference``: ``from X import _y``,
``import X._y``, private components in a module path (``X._y.z``), and attribute access on an
imported project module (``mod._y`` after ``from sonic_learn.reference import routing as mod``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "sonic_learn"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
CHECKED = ("fast", "reference")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str, root: Path) -> bool:
    """Whether ``dotted`` (e.g. ``sonic_learn.fast.topk``) is a module or package of the project."""
    rel = Path(root.parent, *dotted.split("."))
    return rel.with_suffix(".py").is_file() or (rel / "__init__.py").is_file()


def _inside(importer: str, scope: str) -> bool:
    return importer == scope or importer.startswith(scope + ".")


def _private_scopes(dotted: str) -> list[tuple[str, str]]:
    """(private component, the scope that owns it) for every ``_x`` component of a dotted path."""
    parts = dotted.split(".")
    return [(p, ".".join(parts[:i])) for i, p in enumerate(parts) if p.startswith("_") and i > 0]


def violations(path: Path, root: Path = ROOT) -> list[str]:
    """Every use of another scope's private name in the module at ``path``."""
    me = _module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []
    module_aliases: dict[str, str] = {}  # local name -> project module it is bound to

    def check_path(dotted: str, line: int) -> None:
        for name, scope in _private_scopes(dotted):
            if not _inside(me, scope):
                found.append(f"{path.name}:{line}: {me} uses {scope}.{name}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != PACKAGE:
                    continue
                check_path(alias.name, node.lineno)
                if alias.asname:
                    module_aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against this module's package
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != PACKAGE:
                continue
            check_path(base, node.lineno)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if alias.name.startswith("_") and not _inside(me, base):
                    found.append(f"{path.name}:{node.lineno}: {me} imports {full}")
                if _is_module(full, root):
                    module_aliases[alias.asname or alias.name] = full
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in module_aliases):
            owner = module_aliases[node.value.id]
            if not _inside(me, owner):
                found.append(f"{path.name}:{node.lineno}: {me} uses {owner}.{node.attr}")
    return found


def _modules(root: Path) -> list[Path]:
    return sorted(p for sub in CHECKED for p in (root / sub).rglob("*.py"))


@pytest.mark.parametrize("path", _modules(ROOT), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_private_name_of_another_scope(path):
    assert violations(path) == []


def test_the_rule_catches_what_it_should(tmp_path):
    """The checker itself: each kind of violation is found, and the allowed imports are not."""
    pkg = tmp_path / PACKAGE
    for sub in ("fast", "reference"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "_checks.py").write_text("")
    (pkg / "fast" / "_cute.py").write_text("")
    (pkg / "fast" / "topk.py").write_text("def _helper(): pass\n")
    (pkg / "reference" / "routing.py").write_text("def _check(): pass\n")
    bad = pkg / "fast" / "routing.py"
    bad.write_text(
        "from sonic_learn import _checks\n"  # allowed: the root package's private module
        "from sonic_learn.fast._cute import launch\n"  # allowed: its own package's private module
        "from sonic_learn.fast.topk import _helper\n"  # a sibling module's private name
        "from sonic_learn.reference import routing as _ref\n"
        "_ref._check()\n"  # another package's private, through a module alias
        "import sonic_learn.reference.routing as r\n"
        "r._check()\n"
        "from .topk import _helper as h\n"  # relative import of a sibling's private
    )
    ref_mod = pkg / "reference" / "moe.py"
    ref_mod.write_text("from sonic_learn.fast._cute import launch\n")  # another package's private module
    found = violations(bad, pkg)
    assert len(found) == 4, found
    assert any("fast.topk._helper" in f for f in found)
    assert sum("reference.routing._check" in f for f in found) == 2
    assert violations(ref_mod, pkg) and "fast._cute" in violations(ref_mod, pkg)[0]


# ---------------------------------------------------------------------------------------------
# One compile cache: sonic_learn.fast._cute.compiled
# ---------------------------------------------------------------------------------------------
def _cached_compile_functions(path: Path) -> list[str]:
    """Functions of a module that cache compiled kernels themselves (an lru_cache/cache decorator on
    a function that compiles) instead of going through ``compiled``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.FunctionDef):
            continue
        decorated = any("cache" in ast.unparse(d) for d in node.decorator_list)
        compiles = any(isinstance(n, ast.Call) and ast.unparse(n.func).endswith(("cute.compile", "compile_kernel"))
                       for n in ast.walk(node))
        if decorated and (compiles or node.name.startswith(("compile", "_compiled"))):
            found.append(f"{path.name}:{node.lineno} {node.name}")
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "fast").glob("*.py")), ids=lambda p: p.name)
def test_kernels_are_cached_only_by_the_shared_helper(path):
    assert _cached_compile_functions(path) == []


def test_the_cache_check_finds_a_private_cache(tmp_path):
    bad = tmp_path / "mod.py"
    bad.write_text("import functools\n@functools.lru_cache(maxsize=None)\ndef compile_x(a):\n    return a\n"
                   "@functools.lru_cache(maxsize=None)\ndef _compiled(a):\n    return compile_kernel(a)\n")
    assert len(_cached_compile_functions(bad)) == 2


def test_compiled_compiles_each_variant_once():
    from sonic_learn.fast._cute import compiled, compiled_variants

    calls = []

    def compile_fake(kind, n, *, fast=True):
        calls.append((kind, n, fast))
        return object()

    first = compiled(compile_fake, "a", 8, fast=False)
    assert compiled(compile_fake, "a", 8, fast=False) is first  # a dictionary lookup, not a second compile
    assert compiled(compile_fake, "a", 16, fast=False) is not first
    assert calls == [("a", 8, False), ("a", 16, False)]
    assert ("test_compiled_compiles_each_variant_once.<locals>.compile_fake", ("a", 8), {"fast": False}) \
        in compiled_variants()
