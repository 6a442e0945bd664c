"""The code's layering: the library never imports the experiment suite (only the command line reaches it),
and the suite is installed inside permgraph's namespace, not as a top-level package."""

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"cli.py", "__main__.py"}  # the command line: the one place that may reach the suite


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def test_the_library_never_imports_the_experiment_suite():
    for path in sorted((ROOT / "permgraph").rglob("*.py")):
        if path.name in ENTRY_POINTS and path.parent.name == "permgraph":
            continue
        bad = {m for m in _imports(path) if m == "experiments" or m.startswith(("experiments.", "permgraph.experiments"))}
        assert not bad, f"{path.relative_to(ROOT)} imports the experiment suite: {sorted(bad)}"


def test_the_suite_is_permgraph_experiments_and_not_a_top_level_package():
    spec = importlib.util.find_spec("permgraph.experiments")
    assert spec is not None and Path(spec.origin).resolve() == ROOT / "experiments" / "__init__.py"
    from permgraph import experiments

    assert experiments.runner("pair").__name__ == "permgraph.experiments.pair"
    text = (ROOT / "pyproject.toml").read_text()
    assert '"permgraph.experiments" = "experiments"' in text and '"experiments*"' not in text
