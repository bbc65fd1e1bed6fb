"""The import graph, read from the source with `ast`: no circle, nothing importing a higher layer, and a
model that does no I/O. A module that fits no layer below is an error: place it when you add it."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pool", "api", "warmpool", "runner_image")

# Lowest first. A module may import its own layer and the ones below, never one above.
LAYERS: tuple[tuple[str, int], ...] = (
    ("pool.model", 0),  # pure: data types, parsing, tiers, capacity, warming arithmetic, framing, errors
    ("pool.settings", 1),
    ("pool.env_settings", 1),  # the WARMPOOL_* variables, typed (pydantic-settings)
    ("pool.sizes_file", 1),
    ("pool.background", 1),  # the owner of background tasks, shared by both back ends
    ("pool.task_stream", 1),  # a streamed task's output for its followers, shared by both back ends
    ("warmpool.client", 1),  # the Python client: httpx only, nothing of the server (test_client checks it runs so)
    ("warmpool.mcp", 1),  # the MCP tools over the client, served by `warmpool mcp` and by the API's /mcp
    ("pool.engine", 2),  # Docker: backend, containers, channel, tier pools, the manager, the embedded dispatcher
    ("runner_image", 2),  # the image build (Docker) and the in-container runner (stdlib only)
    ("pool.scaleout", 3),  # Redis: the scale-out dispatcher, membership, codec, the worker (over an engine)
    ("pool.dispatch", 4),  # the one door from the API to either back end
    ("api", 5),
    ("warmpool", 6),
)
# What the pure model must never import: engines, networks, processes, event loops, HTTP.
MODEL_FORBIDDEN = ("docker", "redis", "anyio", "asyncio", "requests", "httpx", "socket", "subprocess", "threading",
                   "fastapi", "starlette", "uvicorn", "prometheus_client", "api", "warmpool", "runner_image")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every module `path` imports (at top level or inside a function), as dotted names.

    `from a.b import c` counts as `a.b.c` when that is one of our modules, else as `a.b`."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; use absolute ones"
            base = node.module or ""
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
    return found


def layer_of(module: str) -> int | None:
    for prefix, rank in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return rank
    return None


def graph() -> dict[str, set[str]]:
    """Our modules and the modules of ours that each imports."""
    files = sources()
    ours = set(files)
    edges: dict[str, set[str]] = {}
    for module, path in files.items():
        edges[module] = {m for m in imports_of(path, ours) if m in ours and m != module}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in sources() if m not in PACKAGES and layer_of(m) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS in {Path(__file__).name}): {unplaced}"


def test_every_import_of_ours_names_a_module_that_exists():
    files = sources()
    missing = sorted(f"{module} imports {imported}" for module, path in files.items()
                     for imported in imports_of(path, set(files))
                     if imported.split(".")[0] in PACKAGES and imported not in files)
    assert missing == []


def test_no_import_circle():
    assert cycles(graph()) == []


def test_no_module_imports_a_higher_layer():
    upward = []
    for module, targets in graph().items():
        rank = layer_of(module)
        if rank is None:
            continue
        upward += [f"{module} (layer {rank}) imports {t} (layer {layer_of(t)})" for t in sorted(targets)
                   if (layer_of(t) or 0) > rank]
    assert upward == []


def test_the_model_imports_no_io():
    files = sources()
    offenders = []
    for module, path in files.items():
        if layer_of(module) != 0:
            continue
        for imported in imports_of(path, set(files)):
            top = imported.split(".")[0]
            if top in MODEL_FORBIDDEN or (imported.startswith("pool.") and layer_of(imported) != 0):
                offenders.append(f"{module} imports {imported}")
    assert offenders == []


def test_the_api_reaches_the_pools_only_through_the_dispatcher():
    """api/ may use the door (pool.dispatch), the model's values and the settings: no engine, no Redis. And
    pool.background, the owner of background tasks (the callback relay's), which touches no pool."""
    allowed = ("pool.dispatch", "pool.model", "pool.settings", "pool.background")
    files = sources()
    around = sorted(f"{module} imports {target}" for module, targets in graph().items() if module.startswith("api.")
                    for target in targets if target.startswith("pool.")
                    and not any(target == a or target.startswith(a + ".") for a in allowed))
    assert around == []
    reaching = sorted(str(path.relative_to(REPO)) for module, path in files.items()
                      if module.startswith("api.") and "state.pool" in path.read_text())
    assert reaching == [], "app.state.pool is gone: ask the dispatcher"


def test_the_scale_out_api_holds_no_engine():
    """In scale-out mode the API process runs no containers: its dispatcher reaches no pool.engine module."""
    edges = graph()
    seen, todo = set(), ["pool.scaleout.redis_dispatch"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(edges.get(module, ()))
    assert sorted(m for m in seen if m.startswith("pool.engine")) == []


def test_the_checks_catch_what_they_look_for():
    """The checks themselves: a circle is found, and an upward or I/O import would be named."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert layer_of("pool.model.tiers") == 0 and layer_of("pool.engine.manager") == 2
    assert layer_of("api.routes") == 5 and layer_of("pool.modelling") is None
    imports = imports_of(REPO / "pool" / "dispatch.py", set(sources()))
    assert "pool.settings" in imports and "pool.engine.embedded" in imports, "lazy imports inside functions count"


def test_the_client_stands_alone():
    """warmpool.client imports only itself (and httpx): a client needs nothing of the server."""
    edges = graph()
    strays = sorted(f"{module} imports {target}" for module, targets in edges.items()
                    if module.startswith("warmpool.client") for target in targets
                    if not target.startswith("warmpool.client"))
    assert strays == []
