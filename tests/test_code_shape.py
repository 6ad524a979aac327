"""The code's shape, held by tests: what issue 24 made true stays true (the kernels decide fastmath in one place,
the KV cache alone writes its lengths, the packages import without cycles, no function grows past a screen)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("numbattn", "tinyllm")


def sources():
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_fastmath_is_decided_in_one_place():
    """Only kernels/common.py names fastmath (its FASTMATH keeps -inf and NaN; `kernel` applies it)."""
    offenders = [f"{p.relative_to(ROOT)}:{n.lineno}" for p in sources() for n in ast.walk(ast.parse(p.read_text()))
                 if isinstance(n, ast.keyword) and n.arg == "fastmath" and p.name != "common.py"]
    assert not offenders, f"fastmath set outside numbattn/kernels/common.py: {offenders}"


def test_only_the_cache_writes_its_lengths():
    """`_lengths` (the host mirror of a KV cache's lengths) is assigned only inside its cache: numbattn/kvcache.py,
    numbattn/paged.py."""
    offenders = []
    for p in sources():
        for n in ast.walk(ast.parse(p.read_text())):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AugAssign) else []
            for t in targets:
                text = ast.unparse(t)
                if "_lengths" in text.split("[")[0].split(".")[-1] and text.startswith(("self._lengths", "cache.")):
                    if p.relative_to(ROOT).as_posix() not in ("numbattn/kvcache.py", "numbattn/paged.py"):
                        offenders.append(f"{p.relative_to(ROOT)}:{n.lineno}: {text}")
    assert not offenders


def imports_of(path):
    """Modules of ours that this file imports (at module level or inside functions), resolved to module names."""
    me, tree = module_name(path), ast.parse(path.read_text())
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            found |= {a.name for a in n.names if a.name.split(".")[0] in PACKAGES}
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - n.level + 1] + ([base] if base else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            for a in n.names:       # `from pkg import submodule` imports the submodule; else the module itself
                sub = f"{base}.{a.name}"
                found.add(sub if (ROOT / (sub.replace(".", "/") + ".py")).exists()
                          or (ROOT / sub.replace(".", "/")).is_dir() else base)
    return found - {me}


def test_no_import_cycles():
    graph = {module_name(p): imports_of(p) for p in sources()}
    cycles = []

    def visit(node, path):
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    done = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not cycles, f"import cycles: {[' -> '.join(c) for c in cycles[:5]]}"


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_longer_than_a_screen(package):
    """No function (a kernel factory with its nested device functions included) over 60 lines."""
    long = [f"{p.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p in sorted((ROOT / package).rglob("*.py")) for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert not long
