"""Progress bars for long work (a leaf module): tqdm when it is installed and asked for, else nothing."""

from __future__ import annotations


def progress_bar(enabled: bool, total: int | None, desc: str, **kw):
    """A tqdm bar that clears itself when done and stays silent off a terminal, or None (``enabled`` is
    False, or tqdm is not installed). Callers update and close it when it is not None."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, disable=None, **kw)
