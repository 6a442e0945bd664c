"""Every test leaves the process's global state as it found it, and does not depend on the tests before it.

The suite runs in one process, so a test that changes a global (torch's thread count, its default dtype,
an environment variable, matplotlib's backend, a Ray connection, the working directory) changes the
conditions of every test after it, and results then depend on the order in which tests run. The autouse
fixture below takes a snapshot before each test, compares after it, puts everything back and fails the
test that changed something, naming what changed. Tests that need a changed global use ``monkeypatch``
(environment, working directory) or restore what they changed themselves (try/finally).

Random number generators are the one global every test may use: building a model draws from torch's
generator. So each test starts from the same seeded state (seed 0 for torch, NumPy and Python's
``random``) on its own copy of the generators, and the caller's generators are put back afterwards: a
test's random draws do not depend on which tests ran before it, and cannot change the ones after it.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys

import numpy as np
import pytest
import torch


def _snapshot() -> dict:
    snap = {
        "torch threads": torch.get_num_threads(),
        "torch default dtype": torch.get_default_dtype(),
        # pytest itself rewrites PYTEST_CURRENT_TEST between a test's phases
        "environment": {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"},
        "working directory": os.getcwd(),
    }
    if "matplotlib" in sys.modules:
        snap["matplotlib backend"] = sys.modules["matplotlib"].get_backend()
    if "ray" in sys.modules:
        snap["Ray connection"] = sys.modules["ray"].is_initialized()
    return snap


def _restore(name: str, value) -> None:
    if name == "torch threads":
        torch.set_num_threads(value)
    elif name == "torch default dtype":
        torch.set_default_dtype(value)
    elif name == "environment":
        for k in [k for k in os.environ if k not in value and k != "PYTEST_CURRENT_TEST"]:
            del os.environ[k]
        os.environ.update(value)
    elif name == "working directory":
        os.chdir(value)
    elif name == "matplotlib backend":
        sys.modules["matplotlib"].use(value)
    elif name == "Ray connection":
        if not value:
            sys.modules["ray"].shutdown()


# Variables a library sets once, on first use, to a value it would compute anyway: not a test's doing.
SET_ON_FIRST_USE = {
    "TORCHINDUCTOR_CACHE_DIR",  # torch memoises its default cache folder when it first traces or steps
    "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK",  # scikit-learn sets OpenMP defaults when first imported
}


def _env_changes(before: dict, after: dict) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)
                  and not (k in SET_ON_FIRST_USE and k not in before))


def _describe(name: str, before, after) -> str:
    if name == "environment":
        changed = _env_changes(before, after)
        return f"environment variables {changed}"
    return f"{name} ({before!r} -> {after!r})"


@contextlib.contextmanager
def _seeded_rngs(seed: int = 0):
    """Torch's, NumPy's and Python's global generators seeded with ``seed``; put back afterwards."""
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


@pytest.fixture(autouse=True)
def _leaves_global_state_as_found(request):
    before = _snapshot()
    with _seeded_rngs(0):
        yield
    after = _snapshot()
    changed = []
    for name, value in before.items():
        if name == "environment":
            if _env_changes(value, after[name]):
                changed.append(_describe(name, value, after[name]))
                _restore(name, {**value, **{k: after[name][k] for k in SET_ON_FIRST_USE if k in after[name]}})
        elif name in after and value != after[name]:
            changed.append(_describe(name, value, after[name]))
            _restore(name, value)
    # a global that appears during the test (first import of matplotlib or ray) has no "before"; a Ray
    # connection opened by a test must still be closed by it
    if "Ray connection" not in before and after.get("Ray connection"):
        changed.append("Ray connection (left open)")
        _restore("Ray connection", False)
    if changed:
        pytest.fail(f"{request.node.nodeid} changed global state: {'; '.join(changed)}. "
                    "Restore it in the test (monkeypatch, try/finally).", pytrace=False)


@pytest.fixture(autouse=True, scope="session")
def _strict_rules():
    """A rule that raises anything but StructureError is a bug: in the tests it fails loudly (RuleError)
    instead of freezing the op (what users get, with a RuleWarning)."""
    from permgraph import _walk

    before, _walk.STRICT_RULES = _walk.STRICT_RULES, True
    yield
    _walk.STRICT_RULES = before
