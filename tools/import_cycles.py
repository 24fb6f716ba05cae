"""List import cycles in backend/: between apps (backend.<app>) and between modules.

Usage: python tools/import_cycles.py [folder holding backend/, default: this checkout]

Every import counts, including those inside functions (grimp reads the whole module). The
figures go into docs/architecture.md; `make lint` (import-linter) is what enforces the order.
"""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import grimp


def strongly_connected(nodes: set[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; returns the components with more than one node."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def main() -> int:
    sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parent.parent))
    graph = grimp.build_graph("backend", cache_dir=None)
    modules = {m for m in graph.modules if not m.split(".")[-2:-1] == ["migrations"] and ".migrations." not in m}
    module_edges: dict[str, set[str]] = defaultdict(set)
    app_edges: dict[str, set[str]] = defaultdict(set)
    app_examples: dict[tuple[str, str], list[str]] = defaultdict(list)
    for importer in modules:
        for imported in graph.find_modules_directly_imported_by(importer):
            if imported not in modules or imported == importer:
                continue
            module_edges[importer].add(imported)
            a, b = ".".join(importer.split(".")[:2]), ".".join(imported.split(".")[:2])
            if a != b and a != "backend" and b != "backend":
                app_edges[a].add(b)
                app_examples[(a, b)].append(f"{importer} -> {imported}")
    apps = {".".join(m.split(".")[:2]) for m in modules if m.count(".") >= 1}

    print("app dependencies (importer -> imported):")
    for a in sorted(app_edges):
        print(f"  {a.removeprefix('backend.')} -> {', '.join(sorted(b.removeprefix('backend.') for b in app_edges[a]))}")
    app_cycles = strongly_connected(apps, app_edges)
    mutual = sorted((a, b) for a in app_edges for b in app_edges[a] if a < b and a in app_edges.get(b, ()))
    print(f"\napp-level cycles (strongly connected groups of apps): {len(app_cycles)}")
    for group in app_cycles:
        print("  " + " <-> ".join(g.removeprefix("backend.") for g in group))
    print(f"pairs of apps importing each other: {len(mutual)}")
    for a, b in mutual:
        print(f"  {a.removeprefix('backend.')} <-> {b.removeprefix('backend.')}")
        for line in sorted(app_examples[(a, b)])[:3] + sorted(app_examples[(b, a)])[:3]:
            print(f"      {line.replace('backend.', '')}")
    module_cycles = strongly_connected(modules, module_edges)
    print(f"\nmodule-level cycles (strongly connected groups of modules): {len(module_cycles)}")
    for group in module_cycles:
        print(f"  {len(group)} modules: " + ", ".join(g.removeprefix("backend.") for g in group))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
