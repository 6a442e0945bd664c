"""State-dict files: ``save_state_dict`` / ``load_state_dict`` (safetensors, written atomically), and the
atomic-write helpers every permgraph file writer uses."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping

import torch

__all__ = ["load_state_dict", "save_state_dict"]


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """Create ``path`` by calling ``write(tmp)`` on a temporary file in the same folder, then renaming it:
    a reader, or a run resumed after a crash, finds the old file or the new one, never part of one."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_text(text: str, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_state_dict(state: Mapping[str, torch.Tensor], path: str) -> None:
    """Write a state dict as safetensors, atomically."""
    from safetensors.torch import save_file

    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict written by ``save_state_dict``. Raises ``FileNotFoundError`` if ``path`` does not
    exist and ``FileFormatError`` (naming the file) if it is truncated or not a safetensors file."""
    from safetensors.torch import load_file

    from .errors import FileFormatError

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"state-dict file {path} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder, not a state-dict file")
    try:
        return load_file(path)
    except OSError:
        raise
    except Exception as e:  # safetensors' SafetensorError (a bad header) and friends
        raise FileFormatError(f"state-dict file {path} is truncated or not a safetensors file ({e}); delete it "
                              "and rerun to train the network again, or save it again with save_state_dict") from None
