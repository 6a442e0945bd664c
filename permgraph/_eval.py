"""Evaluation shared by the trainer and the barrier: mean cross-entropy and error rate."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


def evaluate(model: nn.Module, loader: Iterable, device=None) -> dict[str, float]:
    """Mean cross-entropy ``loss``, ``error`` and ``accuracy`` of ``model`` over (input, target) batches,
    in eval mode (the model's train/eval flag is restored afterwards)."""
    was = model.training
    model.eval()
    dev = device or next(model.parameters()).device
    loss, wrong, n = 0.0, 0, 0
    try:
        with torch.no_grad():
            for batch in loader:
                if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                    raise TypeError("evaluation needs (input, target) batches to measure loss and error")
                x, y = batch[0].to(dev), batch[1].to(dev)
                out = model(x)
                loss += float(F.cross_entropy(out, y, reduction="sum"))
                wrong += int((out.argmax(1) != y).sum())
                n += len(y)
    finally:
        model.train(was)
    if n == 0:
        raise ValueError("the evaluation loader yielded no examples")
    return {"loss": loss / n, "error": wrong / n, "accuracy": 1 - wrong / n}
