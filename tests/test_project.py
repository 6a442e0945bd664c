"""The project's own promises: README Quickstart and CI run the same test command; CLI works."""

import re
from pathlib import Path

import permgraph
from permgraph.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _quickstart_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_readme_has_exactly_two_quickstart_commands_and_ci_runs_the_test_one():
    cmds = _quickstart_commands()
    assert len(cmds) == 2
    assert "pytest" in cmds[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert cmds[1] in [ln.strip() for ln in ci]


def test_cli_trace_writes_a_loadable_spec(tmp_path, capsys):
    out = tmp_path / "spec.json"
    assert main(["trace", "mlp", "--json", str(out)]) == 0
    spec = permgraph.PermutationSpec.from_json(out.read_text())
    assert len(spec.groups) == 3
    assert "coverage report" in capsys.readouterr().out


def test_readme_python_blocks_run_verbatim_in_order_in_a_fresh_interpreter(tmp_path):
    """The README's API tour is what a new user pastes first: every ```python block, in order, as one
    script in a new interpreter (files it writes land in a temporary folder)."""
    import subprocess
    import sys

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "README.md has no python blocks"
    script = tmp_path / "readme_tour.py"
    script.write_text("\n".join(blocks))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"README tour failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
