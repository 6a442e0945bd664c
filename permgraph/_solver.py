"""The one place permgraph calls the linear assignment solver.

Contract: ``assign(S)`` takes a square similarity matrix (any float tensor or array; converted to float64)
with ``S[i, j]`` = similarity of A's unit ``i`` and B's unit ``j``, maximises the total similarity, and
returns ``p`` (a LongTensor) with ``p[i]`` = the unit of B matched to A's unit ``i``. In permgraph's
convention (``new = old[p]``) that is exactly the permutation that reorders B's units to A's.
The solver releases the GIL, so independent assignments can run in threads side by side.

``margin(S, p)`` and ``confidence(S, p)`` say how clearly an assignment beats every other one (the
per-group ``margin`` and ``confidence`` diagnostics of both matchers).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def assign(similarity) -> torch.Tensor:
    s = similarity.detach().cpu().double().numpy() if isinstance(similarity, torch.Tensor) else np.asarray(
        similarity, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"assignment needs a square matrix, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("similarity matrix holds NaN or inf values (are the weights or activations finite?)")
    # Minimise the cost -S after a row and then a column reduction (each row's and then each column's
    # minimum subtracted): a constant added to one row or column adds the same to every assignment's
    # total, so the optimal assignments are unchanged, and the solver's augmenting-path searches start
    # nearer the optimum (a third less time on dense 512 x 512 similarities).
    c = -s
    c -= c.min(axis=1, keepdims=True)
    c -= c.min(axis=0, keepdims=True)
    rows, cols = linear_sum_assignment(c)
    assert (rows == np.arange(s.shape[0])).all()
    return torch.from_numpy(cols.astype(np.int64))


# Groups up to this many units get the exact margin (a min-plus closure, O(n^3): 2-3 ms at 128 units on
# one CPU thread, less per matrix when several are closed at once); larger ones get the margin of the best
# exchange of two units (O(n^2)), which bounds the exact one from above. At 256 units the exact one costs
# ~14 ms, which a resnet18's three 256-unit groups would turn into ~3% of its whole weight matching.
EXACT_MARGIN_MAX = 128


def _square(similarity) -> torch.Tensor:
    s = similarity.detach().double() if isinstance(similarity, torch.Tensor) else torch.as_tensor(
        np.asarray(similarity, dtype=np.float64))
    if s.ndim < 2 or s.shape[-1] != s.shape[-2]:
        raise ValueError(f"assignment needs a square matrix, got shape {tuple(s.shape)}")
    return s


def _score(s: torch.Tensor, p: torch.Tensor) -> float:
    return float(s[torch.arange(len(p), device=s.device), p].sum())


def exchange_losses(s: torch.Tensor, p: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
    """For each of A's units ``i``, the least loss of exchanging its partner with another unit's:
    ``min over j != i of S[i, p[i]] + S[j, p[j]] - S[i, p[j]] - S[j, p[i]]`` (an (n,) tensor; ``q`` = the
    inverse of ``p``, computed when not given). Blockwise over the upper triangle (the loss is symmetric
    in ``i`` and ``j``): no n x n temporaries besides ``s``, and cache-sized transposes."""
    n = len(p)
    if n < 2:
        return torch.full((n,), math.inf, dtype=s.dtype)
    p = p.to(s.device)
    if q is None:
        q = torch.empty_like(p)
        q[p] = torch.arange(n, device=s.device)
    q = q.to(s.device)
    d = s[q, torch.arange(n, device=s.device)]  # with Q = S[q]: d[k] = Q[k, k], the score of column k's match
    best = torch.full((n,), -math.inf, dtype=s.dtype, device=s.device)  # per column k of Q: -(least loss)
    bs = min(64, n)
    # work buffers allocated once (fresh large blocks per step cost page faults: twice the time in a run)
    bu, bl, bd = (torch.empty(bs * n, dtype=s.dtype, device=s.device) for _ in range(3))
    for a in range(0, n, bs):
        b = min(a + bs, n)
        r, c = b - a, n - a
        u, left, dd = bu[: r * c].view(r, c), bl[: c * r].view(c, r), bd[: r * c].view(r, c)
        torch.index_select(s[:, a:], 0, q[a:b], out=u)  # Q[a:b, a:]
        torch.index_select(s[:, a:b], 0, q[a:], out=left)  # Q[a:, a:b]
        u.add_(left.T)
        # (Q[k, l] + Q[l, k]) - (Q[k, k] + Q[l, l]): identical rows of S give exactly 0
        torch.add(d[a:b, None], d[None, a:], out=dd)
        u.sub_(dd)
        u[:, :r].diagonal().fill_(-math.inf)
        torch.maximum(best[a:b], u.max(1).values, out=best[a:b])
        torch.maximum(best[a:], u.max(0).values, out=best[a:])
    out = torch.empty_like(best)
    out[q] = 0.0 - best  # column k of Q is A's unit q[k]; not -0.0 for a tie
    return out.cpu()


def _swap_margin(s: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> float:
    """``min over i != j of S[i, p[i]] + S[j, p[j]] - S[i, p[j]] - S[j, p[i]]`` (``q`` = inverse of ``p``)."""
    return float(exchange_losses(s, p, q).min())


def margins(similarity, p, *, exact_max: int = EXACT_MARGIN_MAX) -> list[float]:
    """``margin`` of each of a batch of assignments: ``similarity`` (b, n, n), ``p`` (b, n). The exact
    margins of a batch are found by one min-plus closure of all its matrices at once."""
    s = _square(similarity)
    if s.ndim != 3:
        raise ValueError(f"margins() takes a batch of matrices (b, n, n), got shape {tuple(s.shape)}")
    nb, n = s.shape[0], s.shape[1]
    p = torch.as_tensor(p, dtype=torch.long).to(s.device)
    if p.shape != (nb, n):
        raise ValueError(f"assignments of shape {tuple(p.shape)} for matrices of shape {tuple(s.shape)}")
    if n < 2:
        return [math.inf] * nb
    q = torch.empty_like(p)
    q.scatter_(1, p, torch.arange(n, device=s.device).expand(nb, n))  # q[b, k]: the row matched to column k
    if n > exact_max:
        if nb * n * n > 1 << 16:  # large: in blocks, one matrix at a time
            return [_swap_margin(s[i], p[i], q[i]) for i in range(nb)]
        # small (the blocks inside attention heads): all pairs of all matrices at once
        r = torch.gather(s, 1, q[:, :, None].expand(nb, n, n))  # Q = S[q] per matrix
        d = r.diagonal(dim1=1, dim2=2)
        u = r + r.transpose(1, 2)
        u.sub_(d[:, :, None] + d[:, None, :])  # (Q[k, l] + Q[l, k]) - (Q[k, k] + Q[l, l]), as in _swap_margin
        u.diagonal(dim1=1, dim2=2).fill_(-math.inf)
        return (0.0 - u.amax((1, 2))).tolist()
    # Relabel rows so that p is the identity: w[k, l] = Q[k, k] - Q[k, l] with Q = S[q], the loss when the
    # row matched to column k takes column l instead. Closed under min-plus (Floyd-Warshall), the diagonal
    # holds the cheapest cycle (of at least two rows) through each row.
    w = torch.gather(s, 1, q[:, :, None].expand(nb, n, n))
    d = w.diagonal(dim1=1, dim2=2).clone()
    w.neg_().add_(d[:, :, None])
    w.diagonal(dim1=1, dim2=2).fill_(math.inf)
    buf = torch.empty_like(w)
    for k in range(n):
        torch.add(w[:, :, k : k + 1], w[:, k : k + 1, :], out=buf)
        torch.minimum(w, buf, out=w)
    out = w.diagonal(dim1=1, dim2=2).amin(1).tolist()
    for i, m in enumerate(out):
        if m < 0:  # a cycle that improves p: the best alternative is an optimal assignment
            best = assign(s[i]).to(s.device)
            out[i] = _score(s[i], p[i]) - _score(s[i], best) if bool((best != p[i]).any()) else 0.0
    return out


def margin(similarity, p, *, exact_max: int = EXACT_MARGIN_MAX) -> float:
    """How far the assignment ``p`` (row ``i`` -> column ``p[i]``) scores above the best other assignment.

    With ``score(q) = sum_i S[i, q[i]]`` (maximised, as in ``assign``):

    * ``n <= exact_max`` units (default 128): exactly ``score(p) - max over q != p of score(q)``. Every
      ``q != p`` is ``p`` changed along disjoint cycles of rows (row ``i`` takes the column of row ``j``,
      which takes ...), each costing the sum of its losses ``S[i, p[i]] - S[i, p[j]]``; when ``p`` is
      optimal no cycle has a negative cost and the best alternative is one cheapest cycle, found by a
      Floyd-Warshall closure of the losses. When some cycle has a negative cost, ``p`` is not optimal
      and the result is ``score(p) - score(assign(S))`` (negative).
    * ``n > exact_max``: the best exchange of two rows' columns,
      ``min over i != j of S[i, p[i]] + S[j, p[j]] - S[i, p[j]] - S[j, p[i]]``. That exchange is one of
      the alternatives, so this bounds the exact margin from above (it is exact whenever the cheapest
      cycle has two rows); negative when such an exchange improves ``p``.

    ``0`` means another assignment scores the same (two interchangeable units: two identical rows give
    exactly 0); ``inf`` for fewer than two units (no alternative exists). In the units of ``S``.
    """
    s = _square(similarity)
    if s.ndim != 2:
        raise ValueError(f"assignment needs a square matrix, got shape {tuple(s.shape)}")
    p = torch.as_tensor(p, dtype=torch.long)
    if p.shape != (s.shape[0],):
        raise ValueError(f"assignment of {tuple(p.shape)} entries for a {s.shape[0]} x {s.shape[0]} matrix")
    return margins(s[None], p[None], exact_max=exact_max)[0]


def confidence(similarity, p, margin_value: float | None = None) -> float:
    """``margin(S, p)`` divided by how far the matched pairs' mean similarity lies above that of all pairs,
    ``mean_i S[i, p[i]] - mean_ij S[i, j]`` (the score per unit that ``p`` gains over a random assignment).

    Scale-free: unchanged when ``S`` is multiplied by a positive number or a constant is added to a row
    or a column (which change no assignment's ranking). Near 0 where two units (or a cycle of units)
    could be exchanged at almost no cost; of order 1 when even the closest alternative loses about as
    much as one unit's typical gain; negative when ``p`` is not optimal. ``0`` when every assignment
    scores the same; ``inf`` for a single unit. ``margin_value`` saves recomputing the margin.
    """
    s = _square(similarity)
    if s.ndim != 2:
        raise ValueError(f"assignment needs a square matrix, got shape {tuple(s.shape)}")
    m = margin(s, p) if margin_value is None else float(margin_value)
    return confidences(s[None], torch.as_tensor(p, dtype=torch.long)[None], [m])[0]


def confidences(similarity, p, margin_values: list[float]) -> list[float]:
    """``confidence`` of each of a batch of assignments (``similarity`` (b, n, n), ``p`` (b, n)) from their
    margins."""
    s = _square(similarity)
    nb, n = s.shape[0], s.shape[1]
    if n < 2:
        return [math.inf] * nb
    p = torch.as_tensor(p, dtype=torch.long).to(s.device)
    matched = torch.gather(s, 2, p[:, :, None])[:, :, 0]
    gains = (matched.mean(1) - s.mean((1, 2))).tolist()
    tiny = (1e-12 * matched.abs().amax(1)).tolist()
    out = []
    for m, gain, eps in zip(margin_values, gains, tiny):
        if not gain > eps:  # every assignment scores the same (up to rounding)
            out.append(0.0 if m >= 0 else -math.inf)
        else:
            out.append(m / gain)
    return out
