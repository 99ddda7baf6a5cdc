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


# ---------------------------------------------------------------------------------------
# one contract: the job's plumbing names no valuation method
# ---------------------------------------------------------------------------------------
def _string_constants(path: Path) -> set[str]:
    """Every string literal of the module's code (docstrings left out)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return {n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs}


@pytest.mark.parametrize("module", ["pipeline.py", "config.py", "report_builder.py"])
def test_plumbing_names_no_valuation_method(module):
    """Capabilities and requirements live at registration (``registry``): the pipeline and the
    config checks branch on them, never on a method's name."""
    from recval_ray.registry import VALUERS
    strings = _string_constants(PKG / module)
    named = sorted(m for m in VALUERS.names() if m in strings)
    assert not named, f"{module} names {named}"


def test_each_method_is_one_folder_with_its_report_section():
    """Every registered valuation method lives in ``core/valuers/<method>/`` (its options, its
    valuer, its method-only maths) and its report sections are modules of that folder."""
    import importlib

    from recval_ray.registry import VALUERS
    VALUERS._load()
    for method in VALUERS.names():
        module = importlib.import_module(VALUERS.get(method).factory.__module__)
        folder = Path(module.__file__).parent
        assert module.__file__.endswith("__init__.py") and folder.parent == PKG / "core" / "valuers", method
        for s in VALUERS.meta(method).get("report_sections", ()):
            path = s.partition(":")[0] if isinstance(s, str) else s.__module__
            assert Path(importlib.import_module(path).__file__).parent == folder, (method, s)
    assert not (PKG / "core" / "deletion").exists()


def test_each_method_declares_its_info_as_a_dataclass():
    """A method's facts (``Valuation.info``) are one typed :class:`MethodInfo` per method:
    declared fields, an error for an undeclared one, unset fields absent from the JSON."""
    import importlib
    import json

    from recval_ray.core.valuers.base import MethodInfo
    from recval_ray.output import _json_default
    from recval_ray.registry import VALUERS
    for method in VALUERS.names():
        module = importlib.import_module(VALUERS.get(method).factory.__module__)
        infos = [v for v in vars(module).values()
                 if isinstance(v, type) and issubclass(v, MethodInfo) and v is not MethodInfo]
        assert len(infos) == 1, (method, infos)
        info = infos[0]()
        assert dict(info) == {} and json.loads(json.dumps(info, default=_json_default)) == {}
        with pytest.raises(KeyError, match="declares no field"):
            info["not_a_field"] = 1
        name = next(f for f in info.field_names() if f != "seconds" and getattr(info, f) is None)
        info[name] = 3
        assert info[name] == 3 and name in info and dict(info) == {name: 3} == info


# ---------------------------------------------------------------------------------------
# a new method is one module and its registration
# ---------------------------------------------------------------------------------------
@pytest.fixture
def toy_valuer():
    """A toy valuer registered the way a new method is (here, inside the test): values =
    minus the training loss times ``scale``, with a report section of its own."""
    from dataclasses import dataclass

    import numpy as np

    from recval_ray.core.valuers.base import MethodInfo, Valuation, Valuer
    from recval_ray.registry import VALUERS, register_valuer

    @dataclass(eq=False)
    class ToyInfo(MethodInfo):
        scale: float = 1.0

    @dataclass
    class ToyConfig:
        method: str = "toy-probe"
        scale: float = 1.0

    class ToyValuer(Valuer):
        name = "toy-probe"

        def __init__(self, options):
            self.options = options

        def value(self, ctx):
            loss = np.asarray(ctx.base.interaction_loss, dtype=np.float64)
            return Valuation(method=self.name, values=-self.options.scale * loss,
                             info=ToyInfo(scale=self.options.scale))

    def toy_section(rep, valuation, metrics, values):
        rep.heading("Toy probe section")

    VALUERS._load()
    register_valuer("toy-probe", ToyConfig, report_sections=(toy_section,))(lambda o: ToyValuer(o))
    yield "toy-probe"
    VALUERS._entries.pop("toy-probe", None)


def test_a_toy_valuer_gets_runs_reports_compare_rows_and_sweeps(toy_valuer, tmp_path):
    from recval_ray.compare import run_compare
    from recval_ray.config import load_config
    from recval_ray.pipeline import run_job
    from recval_ray.sweep import sweep_space

    job = str(PKG.parent / "jobs" / "quickstart.yaml")
    tiny = ["data.synthetic.n_users=80", "data.synthetic.n_items=100", "data.synthetic.interactions_per_user=12",
            "train.epochs=2", "train.loss_epochs=1", "prune.random_control=false", f"valuation.method={toy_valuer}", "verdict.enabled=false"]
    cfg = load_config(job, tiny + ["valuation.scale=2.0"])
    run = run_job(cfg, run_id="toy", output_uri=str(tmp_path), use_ray=False)
    assert run.metrics["method"] == toy_valuer
    assert "Toy probe section" in (tmp_path / "toy" / "report.html").read_text()
    # compare rows
    cmp = load_config(job, tiny + ["compare.seeds=[0]", "compare.variants=[full, pruned]"])
    res = run_compare(cmp, run_id="toy-cmp", output_uri=str(tmp_path), use_ray=False)
    assert toy_valuer in set(res.table["method"].to_pylist())
    # a sweep over the toy's own option
    sw = load_config(job, tiny + ["tune.space={valuation.scale: {grid: [1.0, 3.0]}}"])
    assert [d.key for d in sweep_space(sw)] == ["valuation.scale"]


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(PKG)))
def test_core_module_imports_only_the_core(path):
    """The core never reaches up: of this package it imports only ``recval_ray.core``
    (the config's stage options, the registries, errors and storage paths live there)."""
    up = [m for m in imported_modules(path)
          if m.startswith("recval_ray") and not (m == "recval_ray.core" or m.startswith("recval_ray.core."))]
    assert not up, f"{path.relative_to(PKG)} imports {up}"


# ---------------------------------------------------------------------------------------
# no import cycle among the package's modules, function-level imports included
# ---------------------------------------------------------------------------------------
def _module_graph() -> dict:
    mods = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(PKG.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        for target in imported_modules(p):
            while target and target not in mods:
                target = target.rsplit(".", 1)[0] if "." in target else ""
            if target and target != m:
                graph[m].add(target)
    return graph


def _cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    cycles = _cycles(_module_graph())
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
