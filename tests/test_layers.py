"""The package's import-layer contract, checked on the source (no import is executed).

Layers point one way: cli -> build -> {ship, distill, finetune} -> {bench, export, train, tasks} -> {plan, verify}
-> {models, data} -> the foundation modules at edgeforge/'s top level. Within a layer, packages do not import each
other (distill and finetune least of all), with the exceptions listed in SAME_LAYER_ALLOWED. ``plan`` never imports
torch (a plan runs on a laptop without it); ``device_bench`` never imports edgeforge or torch (it runs on the
device). Imports inside functions count: a cycle hidden in a function is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "edgeforge"

LAYERS: dict[str, int] = {
    "": 0,  # errors, paths, fileio, quiet, validation
    "models": 1, "data": 1,
    "plan": 2, "verify": 2,
    "bench": 3, "export": 3, "train": 3, "tasks": 3,
    "ship": 4, "distill": 4, "finetune": 4,
    "build": 5,
    "cli": 6,
    "builtin": 0,
}
#: (importer package, imported package) pairs allowed within one layer, each with its reason.
SAME_LAYER_ALLOWED: dict[tuple[str, str], str] = {}
#: Modules that may sit above the layers: the entry point runs the CLI.
ENTRY_POINTS = {"edgeforge.__main__"}
MAX_TOP_LEVEL_MODULES = 8
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "optimum")


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every import of an edgeforge module, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.append((full if full in known else base, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            out.extend((a.name, "", node.lineno) for a in node.names)
    return out


def _package_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return ""
    return parts[1] if (PACKAGE / parts[1]).is_dir() else ""


def test_layers_point_one_way() -> None:
    known = _modules()
    bad = []
    for name, path in known.items():
        if name in ENTRY_POINTS:
            continue
        src = _package_of(name)
        for target, _, line in _imports(name, path, known):
            if not target.startswith("edgeforge"):
                continue
            dst = _package_of(target)
            if dst == src:
                continue
            if LAYERS[dst] > LAYERS[src]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {src or 'foundation'} (layer {LAYERS[src]}) imports "
                           f"{target} ({dst or 'foundation'}, layer {LAYERS[dst]})")
            elif LAYERS[dst] == LAYERS[src] and (src, dst) not in SAME_LAYER_ALLOWED:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {src} imports {target} of the same layer")
    assert not bad, "\n".join(bad)


def test_no_import_cycles() -> None:
    known = _modules()
    edges: dict[str, set[str]] = {m: set() for m in known}
    for name, path in known.items():
        for target, _, _ in _imports(name, path, known):
            if target in known and target != name:
                # a package's __init__ importing its own submodules (a registry filling itself) is not a cycle
                if path.name == "__init__.py" and target.startswith(name + "."):
                    continue
                edges[name].add(target)
    cycles = []
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(" <-> ".join(sorted(comp)))

    for v in known:
        if v not in index:
            visit(v)
    assert not cycles, "\n".join(cycles)


def test_no_private_name_crosses_modules() -> None:
    known = _modules()
    bad = [f"{path.relative_to(ROOT)}:{line}: imports {target}.{imported}"
           for name, path in known.items() for target, imported, line in _imports(name, path, known)
           if target.startswith("edgeforge") and imported.startswith("_") and not imported.startswith("__")]
    assert not bad, "\n".join(bad)


def test_plan_never_imports_torch() -> None:
    known = _modules()
    bad = [f"{path.relative_to(ROOT)}:{line}: imports {target}"
           for name, path in known.items() if _package_of(name) == "plan"
           for target, _, line in _imports(name, path, known) if target.split(".")[0] in HEAVY]
    assert not bad, "\n".join(bad)


def test_device_bench_stands_alone() -> None:
    agent = ROOT / "device_bench" / "device_bench"
    bad = []
    for path in agent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{path.relative_to(ROOT)}:{node.lineno}: imports {n}" for n in names
                    if n.split(".")[0] in ("edgeforge", *HEAVY)]
    assert not bad, "\n".join(bad)


def test_top_level_holds_only_the_foundation() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    assert set(LAYERS) - {""} == {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
