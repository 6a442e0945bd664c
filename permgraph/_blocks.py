"""Assignments of nested groups: heads moved as wholes, with an independent permutation inside each head.

A nested group of ``nb * block`` units lives in blocks (heads) of ``block`` units; block ``h`` of the
reordered model is an old block ``head[h]``, reordered inside by that block's own permutation (see
``permutation.nest``). Several nested groups can share one head group (queries/keys and values/outputs
of the same attention layer). Both matchers use these two steps:

* ``within``: the heads stay as they are; each head's units are assigned inside the block it takes
  (one assignment of ``block`` units per head);
* ``heads``: heads and their insides together, exactly: the value of pairing A's head ``h`` with B's head
  ``k`` is the best within-block assignment of every nested group for that pair (plus the head group's
  own similarity, where it acts on tensors itself), and the heads are assigned on those values; each pair
  then keeps its best inside assignment. ``nb * nb`` small assignments per nested group (144 of 64 x 64
  units for 12 heads of 64 dims: a few milliseconds).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ._solver import assign
from .permutation import expand_blocks


def _pairs(s: torch.Tensor, nb: int, block: int) -> tuple[torch.Tensor, np.ndarray]:
    """Best within-block assignment value and assignment (``(nb, nb, block)``) for every (A block, B block)
    pair.

    ``nb * nb`` assignments of ``block`` units each: the solver is called on NumPy views directly (the
    checks of ``assign`` run once on the whole matrix), which matters for grouped convolutions, whose many
    small groups make thousands of pairs (RegNet: 46 groups of 8 channels, 2,116 pairs per step)."""
    s4 = s.detach().cpu().double().numpy().reshape(nb, block, nb, block)
    if not np.isfinite(s4).all():
        raise ValueError("similarity matrix holds NaN or inf values (are the weights or activations finite?)")
    cost = -s4
    cols = np.empty((nb, nb, block), dtype=np.int64)
    for h in range(nb):
        for k in range(nb):
            cols[h, k] = linear_sum_assignment(cost[h, :, k, :])[1]
    # values[h, k] = sum_i s4[h, i, k, cols[h, k, i]]
    values = s4[np.arange(nb)[:, None, None], np.arange(block)[None, None, :], np.arange(nb)[None, :, None],
                cols].sum(-1)
    return torch.from_numpy(values), cols


def within(s: torch.Tensor, head: torch.Tensor, block: int, rows: torch.Tensor | None = None,
           current: torch.Tensor | None = None) -> torch.Tensor:
    """A nested group's permutation with the heads fixed (``head``): every A block ``h`` takes B block
    ``head[h]`` and its units are assigned inside it by ``s`` (``nb*block`` square). With ``rows``, only
    those A units (and the B units ``current`` gives them) are reassigned, inside their blocks."""
    nb = len(head)
    s4 = s.reshape(nb, block, nb, block)
    if rows is None:
        parts = []
        for h in range(nb):
            k = int(head[h])
            parts.append(k * block + assign(s4[h, :, k, :]))
        return torch.cat(parts)
    out = expand_blocks(head, block) if current is None else current.clone()
    rows = torch.as_tensor(rows, dtype=torch.long)
    for h in torch.unique(rows // block).tolist():
        r = rows[rows // block == h]
        if len(r) < 2:
            continue
        cols = out[r]
        out[r] = cols[assign(s[r][:, cols])]
    return out


def heads(sims: dict[str, torch.Tensor], nb: int, blocks: dict[str, int],
          head_sim: torch.Tensor | None = None,
          keep: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Assign heads and every nested group inside them at once (see the module's docstring).

    ``sims``: nested group -> its similarity (``nb*block`` square) with every other group fixed;
    ``blocks``: nested group -> block size; ``head_sim``: ``nb x nb`` scores added to the pairs' values
    (the head group's own similarity, ``fixed_scores`` of the groups in ``keep``); ``keep``: nested
    groups that keep their inside order, as ``inside_order`` gives it (they move with their heads).
    Returns the head permutation and the full permutation of every group in ``sims`` and ``keep``."""
    total = torch.zeros(nb, nb, dtype=torch.float64)
    if head_sim is not None:
        total += head_sim.double().cpu()
    choices = {}
    for g, s in sims.items():
        v, c = _pairs(s, nb, blocks[g])
        total += v
        choices[g] = c
    head = assign(total)
    out = {}
    for g, c in choices.items():
        hd = head.numpy()  # A head h takes B head hd[h], with that pair's inside assignment
        out[g] = torch.from_numpy((hd[:, None] * blocks[g] + c[np.arange(nb), hd]).reshape(-1))
    for g, order in (keep or {}).items():
        out[g] = torch.cat([int(head[h]) * blocks[g] + order[int(head[h])] for h in range(nb)])
    return head, out


def inside_order(p: torch.Tensor, head: torch.Tensor, block: int) -> torch.Tensor:
    """``(nb, block)``: row ``k`` is the order a nested group's permutation ``p`` gives B's head ``k``."""
    nb = len(head)
    now = torch.as_tensor(p).view(nb, block) - head[:, None] * block
    order = torch.empty_like(now)
    order[head] = now
    return order


def fixed_scores(s: torch.Tensor, order: torch.Tensor, nb: int, block: int) -> torch.Tensor:
    """``nb x nb`` value of pairing A head ``h`` with B head ``k`` when B head ``k`` keeps the inside order
    ``order[k]`` (a nested group that may not move inside its heads)."""
    s4 = s.reshape(nb, block, nb, block)
    ar = torch.arange(block, device=s.device)
    out = torch.empty(nb, nb, dtype=torch.float64)
    for k in range(nb):
        out[:, k] = s4[:, ar, k, order[k].to(s.device)].sum(1).double().cpu()
    return out
