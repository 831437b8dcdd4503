"""The gateway's modules import each other without a cycle, each one imports alone,
and each imports only the modules its layer allows.

Read statically (ast), so an import under `if TYPE_CHECKING:` or inside a function
counts like any other: a cycle that never fails at start-up still makes every reader
and mypy hold all its modules at once. Then each module is imported by itself in a
fresh interpreter, as aiohttp's tests/test_circular_imports.py does: an order-dependent
import (one that works only because another module happened to load first) fails there.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

import gateway

PACKAGE = Path(gateway.__file__).parent
ROOT = PACKAGE.parent

Graph = Mapping[str, Iterable[str]]

# Which gateway modules each module may import: those of lower layers only, never one
# of its own layer or above. docs/architecture.md's module map follows this table; a
# new module must be placed here (the test says so).
LAYERS: dict[str, int] = {
    "gateway": 0,  # the package's __init__: empty
    # 1: why a try gave no image, the vocabulary under the exception tree
    "gateway.causes": 1,
    # the fair order of a pool's waiters (sans-IO; the registry names its priorities)
    "gateway.fairness": 1,
    # 2: vocabulary (errors, the request schema, log format)
    "gateway.errors": 2,
    "gateway.logs": 2,
    "gateway.schema": 2,
    # 3: the registry's schema and parsing; metric definitions; the answer check;
    # aiohttp's exceptions as causes; the simulated worker
    "gateway.registry": 3,
    "gateway.metrics": 3,
    "gateway.answers": 3,
    "gateway.protocols.client_errors": 3,
    "gateway.simworker": 3,
    "gateway.resp": 3,  # the cache's pipelined GET (redis-py's types only)
    # 4: what each concern needs at run time, on the registry and the metrics; the
    # protocols' shared parts (a try's inputs, the HTTP exchange, images)
    "gateway.protocols.call": 4,
    "gateway.protocols.http": 4,
    "gateway.protocols.imaging": 4,
    "gateway.health": 4,
    "gateway.auth": 4,
    "gateway.cache": 4,
    "gateway.ratelimit": 4,
    "gateway.openapi": 4,
    "gateway.reload": 4,
    "gateway.drain": 4,
    "gateway.middleware": 4,
    "gateway.server": 4,  # the HTTP server's protocol class, bounded by the registry's limits
    "gateway.settings": 4,  # the environment, read once; applied over a registry
    "gateway.simservers": 4,  # the simulated worker's Cog and ComfyUI faces
    "gateway.placement": 4,  # where each adapter should be warm: plain data, no imports
    # 5: each protocol; the balancer (on the health state); coalescing (on the cache)
    "gateway.protocols.friendli_container": 5,
    "gateway.protocols.openai_images": 5,
    "gateway.protocols.a1111": 5,
    "gateway.protocols.cog": 5,
    "gateway.protocols.comfyui": 5,
    "gateway.balancer": 5,
    "gateway.coalesce": 5,
    # 6: the table of protocols; DNS discovery and the replicas' coordination (drive
    # the balancer)
    "gateway.protocols": 6,
    "gateway.discovery": 6,
    "gateway.coordination": 6,
    # 7: what drives a pool through a protocol: the request pipeline, probes
    "gateway.pipeline": 7,
    "gateway.prober": 7,
    # 8: the app's typed state; 9: the HTTP surface; 10: the app assembled in its
    # lifespan; 11: the public testing kit, on the app; 12-13: the command line
    "gateway.state": 8,
    "gateway.routes": 9,
    "gateway.app": 10,
    "gateway.testing": 11,  # fake workers, the gateway in memory or served in process
    "gateway.cli": 12,
    "gateway.__main__": 13,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def gateway_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_in(source: str, module: str, known: Iterable[str], *, package: bool) -> set[str]:
    """The known modules `source` imports, wherever the import statement sits.
    `from X import a` imports X, and X.a too where that is a module; `package` says
    whether `module` is a package's __init__ (for relative imports)."""
    known = set(known)
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, module, package=package)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    resolved = {_longest_known(name, known) for name in found}
    return {name for name in resolved if name is not None}


def _absolute(target: str | None, level: int, module: str, *, package: bool) -> str:
    if level == 0:
        return target or ""
    parts = module.split(".")
    anchor = parts if package else parts[:-1]
    anchor = anchor[: len(anchor) - (level - 1)]
    return ".".join([*anchor, target] if target else anchor)


def _longest_known(name: str, known: set[str]) -> str | None:
    # `import gateway.protocols.friendli_container` names the deepest module it loads;
    # `from gateway.errors import ConfigError` names gateway.errors.ConfigError, a class.
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if (candidate := ".".join(parts[:end])) in known:
            return candidate
    return None


def import_graph() -> dict[str, set[str]]:
    """Module -> the gateway modules it imports."""
    modules = gateway_modules()
    return {
        name: imports_in(path.read_text(), name, modules, package=path.name == "__init__.py")
        for name, path in modules.items()
    }


def cycles(graph: Graph) -> list[list[str]]:
    """Every cycle, as the sorted members of a strongly connected component of more
    than one module (or of one module importing itself). Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] != index[node]:
            return
        component: list[str] = []
        while True:
            member = stack.pop()
            on_stack.discard(member)
            component.append(member)
            if member == node:
                break
        if len(component) > 1 or node in graph.get(node, ()):
            found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def layer_breaches(graph: Graph, layers: Mapping[str, int]) -> list[str]:
    breaches = [f"{name}: not in LAYERS" for name in sorted(graph) if name not in layers]
    for name in sorted(graph):
        for target in sorted(graph[name]):
            if name in layers and layers.get(target, 0) >= layers[name]:
                breaches.append(
                    f"{name} (layer {layers[name]}) imports {target} (layer {layers.get(target)})"
                )
    return breaches


# --- the checks themselves can fail ------------------------------------------


def test_cycles_finds_a_cycle_and_only_its_members() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []


def test_every_kind_of_import_counts() -> None:
    known = {
        "gateway",
        "gateway.errors",
        "gateway.metrics",
        "gateway.balancer",
        "gateway.protocols",
        "gateway.protocols.friendli_container",
        "gateway.health",
    }
    source = (
        "from typing import TYPE_CHECKING\n"
        "import gateway.errors\n"
        "from gateway.protocols import friendli_container\n"
        "if TYPE_CHECKING:\n"
        "    from gateway.balancer import Balancer\n"
        "def f():\n"
        "    from gateway.metrics import Metrics\n"
        "from . import health\n"
        "import os, aiohttp\n"
    )
    found = imports_in(source, "gateway.x", known, package=False)
    assert found == {
        "gateway",  # `from . import health` runs the package's __init__ first
        "gateway.errors",
        "gateway.protocols",
        "gateway.protocols.friendli_container",
        "gateway.balancer",
        "gateway.metrics",
        "gateway.health",
    }
    inside = "from .friendli_container import FriendliContainer\nfrom .. import errors\n"
    assert imports_in(inside, "gateway.protocols", known, package=True) == {
        "gateway",
        "gateway.protocols.friendli_container",
        "gateway.errors",
    }


def test_layer_breaches_names_upward_and_unplaced_imports() -> None:
    graph = {"low": {"high"}, "high": {"low"}, "new": set()}
    assert layer_breaches(graph, {"low": 0, "high": 1}) == [
        "new: not in LAYERS",
        "low (layer 0) imports high (layer 1)",
    ]


# --- the gateway -------------------------------------------------------------


def test_no_import_cycle() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles among gateway modules:\n" + "\n".join(
        " <-> ".join(cycle) for cycle in found
    )


def test_imports_follow_the_layers() -> None:
    graph = import_graph()
    assert not layer_breaches(graph, LAYERS), "\n".join(layer_breaches(graph, LAYERS))
    assert set(LAYERS) == set(graph), f"LAYERS names gone modules: {set(LAYERS) - set(graph)}"


def _importing(module: str) -> list[str]:
    # gateway.__main__ runs the CLI when imported: run it the way it is meant to be.
    if module.endswith(".__main__"):
        return ["-m", module.removesuffix(".__main__"), "--help"]
    return ["-c", f"import {module}"]


@pytest.mark.parametrize("module", sorted(gateway_modules()))
def test_module_imports_alone(module: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-W", "error", *_importing(module)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


# -- docs/architecture.md's module map is the real one ------------------------------------

_MAP_ROW = re.compile(r"^\| (\d+) \| `([\w.]+)` \| [^|]* \| ([^|]*) \|$", re.M)


def documented_map() -> dict[str, tuple[int, set[str]]]:
    """docs/architecture.md's module map: module -> (layer, gateway modules it imports),
    names as written there (without `gateway.`; a protocol module by its last part)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    return {
        "gateway." + module: (
            int(layer),
            {n.strip() for n in imports.split(",") if n.strip() != "—"},
        )
        for layer, module, imports in _MAP_ROW.findall(text)
    }


def _short(module: str) -> str:
    return module.removeprefix("gateway.").removeprefix("protocols.")


def test_the_documented_module_map_matches_the_imports() -> None:
    graph, documented = import_graph(), documented_map()
    listed = set(graph) - {"gateway", "gateway.__main__"}
    assert set(documented) == listed, "modules missing from or unknown to the map"
    wrong = {
        module: (layer, sorted(names))
        for module, (layer, names) in documented.items()
        if layer != LAYERS[module] or names != {_short(t) for t in graph[module] - {"gateway"}}
    }
    assert not wrong, f"docs/architecture.md's map differs from the code for {wrong}"
