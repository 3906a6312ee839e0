"""The package's layout rules, checked rather than commented: what Ray Train's controller imports
stays light, modules never import each other in a circle, and nothing patches sys.path."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

from conftest import REPO

# Ray Train's controller unpickles the per-worker functions (placesnet.launch.trainer) and the
# run-outputs callback (placesnet.launch.outputs) for every run: importing torchvision,
# matplotlib or pandas there costs each run seconds before any worker starts.
CONTROLLER_IMPORTS = ("placesnet.launch.trainer", "placesnet.launch.outputs")
HEAVY = ("torchvision", "matplotlib", "pandas")


def _loaded_after(imports: list[str]) -> set[str]:
    code = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        "import ray.train, ray.train.torch\n"  # Ray Train itself (it loads pandas on its own)
        "base = set(sys.modules)\n"
        + "".join(f"import {m}\n" for m in imports)
        + "print(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - base})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_ray_trains_controller_imports_no_torchvision_matplotlib_or_pandas():
    added = _loaded_after(list(CONTROLLER_IMPORTS))
    assert "placesnet" in added  # the check sees what the imports load
    assert not added & set(HEAVY), f"the controller's imports load {sorted(added & set(HEAVY))}"
    # and the check can fail: the worker loop (data pipeline) does load torchvision
    assert "torchvision" in _loaded_after(["placesnet.launch.worker"])


def _imports(path, module: str, is_pkg: bool) -> set[str]:
    """The placesnet modules that ``module`` imports (at module level or inside functions)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join([*parts, *filter(None, [node.module])])
            names = [f"{base}.{a.name}" for a in node.names]
            modules.update([base, *names])
        elif isinstance(node, ast.Import):
            modules.update(a.name for a in node.names)
    return {m for m in modules if m.startswith("placesnet")}


def test_no_import_circles_in_the_package():
    files = {}
    for path in (REPO / "placesnet").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        is_pkg = parts[-1] == "__init__"
        files[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    graph = {m: {t for t in _imports(p, m, pkg) if t in files and t != m} for m, (p, pkg) in files.items()}
    circles = set()
    for start in graph:  # depth-first search for a path back to start
        stack = [(start, (start,))]
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    circles.add(" -> ".join(sorted(path)))
                elif nxt not in path and len(path) < 8:
                    stack.append((nxt, (*path, nxt)))
    assert not circles, "modules that import each other: " + "; ".join(sorted(circles))


def test_nothing_patches_sys_path():
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True).stdout
    patch = "sys.path." + "insert"  # (spelled apart, so this file is not an offender)
    offenders = [f for f in tracked.split() if patch in (REPO / f).read_text()]
    assert not offenders, f"{offenders} patch sys.path: the project installs with `pip install -e .`"
