"""The import graph runs downward only (ops <- models <- parallel <- engine / train / server / cli) and no package
module imports the test helpers: checked on the source, so a new upward import fails here, not in review."""
import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ringlinear")

# Lower numbers may not import higher ones. Modules of one level may import each other.
LEVELS = {"backend": 0, "ops": 0, "models": 1, "sampling": 2, "generation": 2, "parallel": 2, "engine": 3, "train": 3,
          "rl": 4, "sweep": 4, "server": 4, "cli": 4, "cli_model": 4, "__main__": 4, "__init__": 4}


def _modules():
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                yield path, rel


def _imports(path, rel):
    """Absolute dotted names (under ringlinear) that module `rel` imports."""
    tree = ast.parse(open(path).read())
    pkg = rel[:-1] if rel[-1] != "__init__" else rel[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = (["ringlinear"] + pkg)[:len(pkg) + 1 - (node.level - 1)]
                mod = base + (node.module.split(".") if node.module else [])
                names = [mod + [a.name] for a in node.names] if not node.module else [mod]
            elif node.module and node.module.startswith("ringlinear"):
                names = [node.module.split(".")]
            else:
                continue
            for n in names:
                yield n
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("ringlinear"):
                    yield a.name.split(".")


def _level(parts):
    top = parts[1] if len(parts) > 1 else "__init__"
    return LEVELS[top]


def test_imports_run_downward_and_never_reach_testing():
    upward, testing = [], []
    for path, rel in _modules():
        if rel == ["testing"]:
            continue
        mine = _level(["ringlinear"] + rel)
        for imp in _imports(path, rel):
            if imp[:2] == ["ringlinear", "testing"]:
                testing.append("/".join(rel))
            elif len(imp) > 1 and imp[1] in LEVELS and _level(imp) > mine:
                upward.append(f"{'/'.join(rel)} imports {'.'.join(imp)}")
    assert not testing, testing
    assert not upward, upward
