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


def _module_graph():
    import networkx as nx

    mods = {}
    for p in (ROOT / "permgraph").rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    g = nx.DiGraph()
    for m, p in mods.items():
        if m in ("permgraph", "permgraph.cli", "permgraph.__main__"):  # the package's face and the entry point
            continue
        g.add_node(m)
        for i in _imports(p):
            target = i if i in mods else i.rsplit(".", 1)[0]
            if target in mods and target not in (m, "permgraph"):
                g.add_edge(m, target)
    return g


def test_no_import_cycles_and_the_spec_is_the_bottom_layer():
    """Counting imports inside functions too: no module of the library reaches back to one that imports
    it, and the layers run spec <- permutation <- verify <- trace <- matchers <- alignment <- barrier/prune."""
    import networkx as nx

    g = _module_graph()
    cycles = list(nx.simple_cycles(g))
    assert not cycles, f"import cycles: {[' -> '.join(c) for c in cycles[:5]]}"
    p = "permgraph."
    assert set(g.successors(p + "spec")) <= {p + "errors", p + "_report"}
    assert not set(g.successors(p + "_report"))  # presentation only: a leaf
    order = ["spec", "permutation", "_verify", "_labels", "_walk", "_build", "_trace", "_weight", "_activations", "alignment", "interpolation",
             "prune"]
    for i, lower in enumerate(order):  # nothing reaches up the stack
        for upper in order[i + 1:]:
            assert not nx.has_path(g, p + lower, p + upper), f"{lower} depends on {upper}"
    assert nx.has_path(g, p + "alignment", p + "spec") and nx.has_path(g, p + "_trace", p + "_verify")


def test_a_failing_rule_is_loud_in_strict_mode_and_frozen_with_a_warning_otherwise(monkeypatch):
    import pytest
    import torch

    import permgraph
    from permgraph import _walk

    orig = _walk.lookup

    def boom(cx, node):
        raise TypeError("a bug in the rule")

    monkeypatch.setattr(_walk, "lookup", lambda t: boom if "relu" in str(t) else orig(t))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = (torch.randn(3, 4),)
    with pytest.raises(_walk.RuleError, match="permgraph's rule for .*relu.* failed .*TypeError: a bug in the rule"):
        permgraph.trace(model, x)  # the test suite runs in strict mode (conftest)
    monkeypatch.setattr(_walk, "STRICT_RULES", False)
    with pytest.warns(_walk.RuleWarning, match="please report it"):
        spec = permgraph.trace(model, x)
    assert len(spec.groups) == 0 and spec.info["verification"]["status"] == "passed"  # frozen, still correct
