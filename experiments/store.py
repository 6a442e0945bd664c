"""The one place that names artifact paths and writes files. Every write is atomic (write, then rename).

Layout under the store root (``--out``)::

    networks/<key-hash>/        one trained network: ckpt_epoch{n}.safetensors, final.safetensors,
                                metrics.jsonl, last.safetensors (resumable), key.json (what was trained)
    runs/<kind>-<name>-<hash>/  one experiment run: spec.json, units/*.json (finished units of work),
                                results.json, report.md, *.png, log.txt (timestamps and host: not results)
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def key_hash(obj: Any) -> str:
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:16]


def atomic_write(path: Path, data: bytes | str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    """The JSON value in ``path``. Raises ``FileNotFoundError`` if it does not exist and
    ``permgraph.FileFormatError`` (naming the file) if it is not valid JSON, e.g. cut short by a crash."""
    from permgraph.errors import FileFormatError

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise FileFormatError(f"{path} is not a JSON file (not UTF-8 text); delete it and rerun to write it "
                              "again") from None
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{path} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); it may "
                              "have been cut short: delete it and rerun to write it again") from None


class Store:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def network_dir(self, key: dict) -> Path:
        return self.root / "networks" / key_hash(key)

    def run_dir(self, spec) -> Path:
        return self.root / "runs" / spec.run_name()

    def unit_path(self, run_dir: Path, name: str) -> Path:
        return run_dir / "units" / f"{name}.json"

    def log(self, run_dir: Path, message: str) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "log.txt", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {os.uname().nodename} {message}\n")
