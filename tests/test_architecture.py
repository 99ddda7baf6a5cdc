"""Static checks of the architecture (issue 19): the core never reaches Ray.

Every ``import`` statement of every module under ``recval_ray/core/`` is read from its syntax
tree, those inside functions included (an import at call time is still a dependency): none may
name ``ray`` or ``recval_ray.ray_layer`` (absolute, or relative from any depth).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "recval_ray"
CORE = sorted((PKG / "core").rglob("*.py"))


def imported_modules(path: Path) -> list[str]:
    """Absolute names of every module ``path`` imports, at any depth of its syntax tree."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ".".join(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append(mod)
            out += [f"{mod}.{a.name}" for a in node.names]
    return out


def test_there_are_core_modules():
    assert len(CORE) > 20


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(PKG)))
def test_core_module_imports_no_ray(path):
    bad = [m for m in imported_modules(path)
           if m == "ray" or m.startswith("ray.") or m.startswith("recval_ray.ray_layer")]
    assert not bad, f"{path.relative_to(PKG)} imports {bad}"


def test_the_check_sees_imports_inside_functions(tmp_path):
    """The checker itself: a function-level relative import of the Ray layer is found."""
    f = PKG / "core" / "valuers" / "_probe_for_test.py"
    try:
        f.write_text("def g():\n    from ...ray_layer.explain import x\n    import ray\n")
        found = imported_modules(f)
        assert "recval_ray.ray_layer.explain" in found and "ray" in found
    finally:
        f.unlink()
