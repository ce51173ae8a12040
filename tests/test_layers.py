"""The import rule of the README's "Code map", read from the source: what may import what."""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = "khqr_gateway"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Pure: values and rules with no I/O. They import the standard library, orjson and one another.
PURE = {
    "apps.model",
    "bakong.model",
    "bakong.khqr",
    "bakong.breaker",
    "credentials.model",
    "deliveries.model",
    "deliveries.retry",
    "deliveries.signing",
    "notices.model",
    "transactions.model",
    "times",
}
PURE_THIRD_PARTY = {"orjson"}
# Adapters to what is outside the process; they know no concept.
ADAPTERS = {"bakong", "infra"}
CONCEPTS = {"apps", "transactions", "deliveries", "credentials", "notices"}
# Below everything but the pure modules: settings, logging and metrics.
FOUNDATION = {"config", "logs", "metrics", ""}
# Only these may import each of the top layers.
IMPORTED_ONLY_BY = {
    "cli": {"__main__"},
    "__main__": set(),
    "http": {"http", "cli"},
    "service": {"http", "cli"},
    "dev": {"dev", "cli", "service"},
    "webhooks": set(),  # the receiver's helper: for code outside the gateway
}
# The modules of http/ that hold route handlers (one resource each). What they share lives in
# modules made for it (request, json, errors, paging, idempotency, tracking, sse, qr, ...).
HANDLERS = {
    "http.apps",
    "http.compat",
    "http.credentials",
    "http.dashboard",
    "http.deliveries",
    "http.exports",
    "http.khqr",
    "http.notices",
    "http.ops",
    "http.pay",
    "http.transactions",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """(modules of the package, other top-level packages) that a file imports, anywhere in it."""
    ours: set[str] = set()
    others: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module.split(".")[0] == PACKAGE:
                inner = node.module.removeprefix(PACKAGE).lstrip(".")
                subs = [f"{inner}.{a.name}".lstrip(".") for a in node.names]
                names += [f"{PACKAGE}.{s}" for s in subs if is_module(s)]
        else:
            continue
        for name in names:
            if name.split(".")[0] == PACKAGE:
                ours.add(name.removeprefix(PACKAGE).lstrip("."))
            else:
                others.add(name.split(".")[0])
    return ours, others


def graph(root: Path = ROOT) -> dict[str, tuple[set[str], set[str]]]:
    return {module_name(p): imports_of(p) for p in sorted(root.rglob("*.py"))}


def top(module: str) -> str:
    return module.split(".")[0]


def broken_rules(edges: dict[str, tuple[set[str], set[str]]]) -> list[str]:
    """Every import that breaks the rule, as 'importer -> imported: why'."""
    broken: list[str] = []
    stdlib = sys.stdlib_module_names
    for importer, (ours, others) in edges.items():
        for imported in sorted(ours - {importer}):
            why = _why(importer, imported)
            if why:
                broken.append(f"{importer} -> {imported}: {why}")
        if importer in PURE:
            for other in sorted(others - set(stdlib) - PURE_THIRD_PARTY - {"__future__"}):
                broken.append(f"{importer} -> {other}: a pure module imports only the stdlib")
    broken += [f"package cycle: {' -> '.join(c)}" for c in _package_cycles(edges)]
    return broken


def _why(importer: str, imported: str) -> str | None:
    if importer in HANDLERS and imported in HANDLERS:
        return "a handler module imports no other handler module"
    if importer in PURE and imported not in PURE and imported != "":
        return "a pure module imports only pure modules"
    if top(importer) in ADAPTERS and top(imported) in CONCEPTS:
        return "an adapter knows no concept"
    if top(importer) in FOUNDATION and top(imported) in CONCEPTS | ADAPTERS:
        if imported not in PURE:
            return "config, logs and metrics import only pure modules"
    allowed = IMPORTED_ONLY_BY.get(top(imported))
    if allowed is not None and top(importer) not in allowed | {top(imported)}:
        return f"{top(imported)} is imported only by {sorted(allowed) or 'nothing'}"
    return None


def _package_cycles(edges: dict[str, tuple[set[str], set[str]]]) -> list[list[str]]:
    between: dict[str, set[str]] = defaultdict(set)
    for importer, (ours, _) in edges.items():
        for imported in ours:
            if top(importer) != top(imported) and "" not in (importer, imported):
                between[top(importer)].add(top(imported))
    cycles: list[list[str]] = []

    def walk(node: str, path: list[str]) -> None:
        for nxt in sorted(between[node]):
            if nxt == path[0]:
                cycles.append([*path, nxt])
            elif nxt not in path and nxt > path[0]:
                walk(nxt, [*path, nxt])

    for start in sorted(between):
        walk(start, [start])
    return cycles


def test_the_package_keeps_its_import_rule() -> None:
    assert broken_rules(graph()) == []


def test_every_handler_module_is_named() -> None:
    """A module of http/ that the factory imports besides these is a handler the rule misses."""
    ours, _ = graph()["http.app"]
    libraries = {
        "http",
        "http.auth",
        "http.middleware",
        "http.openapi",
        "http.request",
        "http.sse",
    }
    assert {m for m in ours if m.startswith("http")} - libraries == HANDLERS


@pytest.mark.parametrize(
    ("module", "source", "broken"),
    [
        (
            "transactions/model.py",
            "from khqr_gateway.infra import db\n",
            "transactions.model -> infra.db: a pure module imports only pure modules",
        ),
        (
            "deliveries/retry.py",
            "import aiohttp\n",
            "deliveries.retry -> aiohttp: a pure module imports only the stdlib",
        ),
        (
            "infra/db.py",
            "from khqr_gateway.transactions import store\n",
            "infra.db -> transactions.store: an adapter knows no concept",
        ),
        (
            "transactions/poller.py",
            "from khqr_gateway.http.errors import ApiError\n",
            "transactions.poller -> http.errors: http is imported only by ['cli', 'http']",
        ),
        (
            "config.py",
            "from khqr_gateway.deliveries.ssrf import AddressPolicy\n",
            "config -> deliveries.ssrf: config, logs and metrics import only pure modules",
        ),
        (
            "credentials/renewal.py",
            "from khqr_gateway.transactions import poller\n",
            "package cycle: credentials -> transactions -> credentials",
        ),
        (
            "http/khqr.py",
            "from khqr_gateway.http.transactions import load_create\n",
            "http.khqr -> http.transactions: a handler module imports no other handler module",
        ),
        (
            "http/compat.py",
            "from khqr_gateway.http import pay\n",
            "http.compat -> http.pay: a handler module imports no other handler module",
        ),
    ],
)
def test_a_broken_rule_is_named(tmp_path: Path, module: str, source: str, broken: str) -> None:
    """The check itself: one forbidden import added to a copy of the package is reported."""
    edges = graph()
    name = module.removesuffix(".py").replace("/", ".")
    ours, others = edges[name]
    extra_ours, extra_others = _imports_of_text(tmp_path, source)
    edges[name] = (ours | extra_ours, others | extra_others)
    assert broken in broken_rules(edges)


def _imports_of_text(tmp_path: Path, source: str) -> tuple[set[str], set[str]]:
    path = tmp_path / "snippet.py"
    path.write_text(source)
    return imports_of(path)
