"""The house rules of ``course_utils``, measured: small modules, no import loops, imports at the top.

* no module of the student package is over :data:`MAX_LINES` lines;
* the graph of imports between its modules (module level and inside functions alike) has no cycle;
* a function may import a sibling module only with a comment on that line or the line above
  saying why (a lazy heavy dependency, say);
* every folder of the package is a regular package (has an ``__init__.py``);
* one cache root, one run-folder naming and one offline decision: the functions that read
  ``COURSE_CACHE`` and ``COURSE_OFFLINE``, hash a folder name or open a socket live in one place.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "course_utils"
MAX_LINES = 550


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` refers to."""
    if node.level == 0:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for _ in range(node.level - 1):
        package = package.rsplit(".", 1)[0]
    return f"{package}.{node.module}" if node.module else package


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Edges module -> course_utils modules it imports (a ``from pkg import mod`` counts as mod)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = _resolve(module, path, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[module] |= {t for t in targets if t in modules and t != module}
    return graph


def test_no_module_is_too_big() -> None:
    sizes = {m: len(p.read_text().splitlines()) for m, p in _modules().items()}
    big = {m: n for m, n in sizes.items() if n > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_no_import_loops() -> None:
    graph = _imports(_modules())
    # a package importing its own submodules (``__init__`` re-exports) is not a loop
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import loop: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_function_level_sibling_imports_say_why() -> None:
    bad = []
    for path in _modules().values():
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                sibling = (isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("course_utils"))) or (
                    isinstance(node, ast.Import) and any(a.name.startswith("course_utils") for a in node.names))
                if sibling and "#" not in lines[node.lineno - 1] and not lines[node.lineno - 2].strip().startswith("#"):
                    bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not bad, "function-level imports of sibling modules without a comment saying why:\n" + "\n".join(bad)


def _grep(pattern: str) -> list[str]:
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(pattern, line) and not line.lstrip().startswith("#"):
                hits.append(f"{path.relative_to(PACKAGE.parent)}:{i}")
    return hits


def test_one_cache_root_one_run_folder_one_offline_decision() -> None:
    assert [h.split(":")[0] for h in _grep(r"""environ.*["']COURSE_CACHE""")] == ["course_utils/cache.py"]
    assert [h.split(":")[0] for h in _grep(r"""environ.*["']COURSE_OFFLINE""")] == ["course_utils/registry.py"]
    assert [h.split(":")[0] for h in _grep(r"\bdef cache_root\b|\bdef cache_dir\b")] == ["course_utils/cache.py"]
    assert [h.split(":")[0] for h in _grep(r"\bdef run_dir\b|\bdef checkpoint_dir\b|\bdef checkpoint_root\b")] == [
        "course_utils/cache.py"]
    # folder names are hashed in one place; the other sha256 users hash file or weight contents
    hashing = {h.split(":")[0] for h in _grep(r"hashlib\.sha256\(")}
    assert hashing <= {"course_utils/cache.py", "course_utils/clip/small.py", "course_utils/tracking.py"}, hashing
    assert {h.split(":")[0] for h in _grep(r"socket\.(create_connection|socket)\(")} == {"course_utils/registry.py"}


def test_every_subpackage_has_an_init() -> None:
    # setuptools' find_packages (pyproject's packages.find) skips a folder without __init__.py:
    # a regular, non-editable install would then silently lack its modules
    folders = {p.parent for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(str(f.relative_to(PACKAGE.parent)) for f in folders if not (f / "__init__.py").is_file())
    assert not missing, f"folders without __init__.py: {missing}"
