"""Run the ```python blocks of documentation pages, in order, as one session per page.

    python docs/examples.py check docs/*.md   # run; report blocks whose output differs from the page
    python docs/examples.py fill docs/x.md    # run; write each block's output into the ```text after it

The test suite runs every page (tests/test_docs.py) so that the examples keep working.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import time

BLOCK = re.compile(r"```python\n(.*?)```(\n\n```text\n(.*?)```)?", re.S)


@contextlib.contextmanager
def _session():
    """The conditions the pages' outputs were recorded under (one torch thread, so that printed numbers
    do not depend on the machine's core count), restored afterwards: the examples seed torch's global
    random number generator and set the thread count, and the caller (a test suite, say) keeps its own."""
    import random

    import numpy as np
    import torch

    threads, dtype, py_state, np_state = torch.get_num_threads(), torch.get_default_dtype(), random.getstate(), \
        np.random.get_state()
    backend = sys.modules["matplotlib"].get_backend() if "matplotlib" in sys.modules else None
    try:
        with torch.random.fork_rng(devices=[]):
            torch.set_num_threads(1)
            yield
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
        random.setstate(py_state)
        np.random.set_state(np_state)
        if "matplotlib.pyplot" in sys.modules:  # the pages' figures, and the backend they chose
            sys.modules["matplotlib.pyplot"].close("all")
        if backend is not None:
            sys.modules["matplotlib"].use(backend)


def run(path: str) -> list[tuple[re.Match, str, float]]:
    src = open(path).read()
    ns = {"__name__": "__main__"}
    out = []
    with _session():
        for m in BLOCK.finditer(src):
            buf = io.StringIO()
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(buf):
                exec(compile(m.group(1), f"{path}:block{len(out) + 1}", "exec"), ns)
            out.append((m, buf.getvalue(), time.perf_counter() - t0))
    return out


def main(argv: list[str]) -> int:
    mode, paths = argv[0], argv[1:]
    status = 0
    for path in paths:
        results = run(path)
        if mode == "fill":
            src = open(path).read()
            pieces, pos = [], 0
            for m, text, _ in results:
                pieces.append(src[pos:m.start()])
                block = "```python\n" + m.group(1) + "```"
                if m.group(2) is not None:
                    block += "\n\n```text\n" + text + "```"
                pieces.append(block)
                pos = m.end()
            pieces.append(src[pos:])
            open(path, "w").write("".join(pieces))
        differ = [i for i, (m, text, _) in enumerate(results) if m.group(2) is not None and m.group(3) != text]
        print(f"{path}: {len(results)} blocks ran in {sum(r[2] for r in results):.1f} s"
              + (f"; output differs in blocks {[i + 1 for i in differ]}" if differ and mode == "check" else ""))
        status |= bool(differ) and mode == "check"
    return int(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
