"""The acceptance rules of one verification step: which drafted tokens the target keeps, and the
token it adds itself. Pure functions over the target's and the draft's outputs, so tests check
them against independent formulas.

Both see the target at ``[x, d_1..d_k]`` (``x`` the last emitted token, ``d_i`` the drafts):

* temperature 0 (``greedy_accept``): accept while the target argmax equals the draft token,
  then emit the target's own token (the correction, or the bonus after all k);
* temperature > 0 (``speculative_accept``): speculative sampling (Leviathan et al. 2023, Chen
  et al. 2023): accept ``d_i`` with probability ``min(1, p(d_i)/q(d_i))``, on rejection sample
  ``normalize(max(0, p - q))``, after all k sample the bonus from ``p``. ``p`` and ``q`` are
  over the full target vocab (``q`` is 0 outside the draft vocab), so the output is distributed
  exactly as the target's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["greedy_accept", "sample", "speculative_accept"]


def greedy_accept(target_argmax: Tensor, draft_tokens: Sequence[int]) -> tuple[int, int]:
    """``target_argmax`` ``[k+1]`` at ``[x, d_1..d_k]``: accept the longest prefix of drafts the
    target predicts itself; return (accepted count, the target's token after it)."""
    k = len(draft_tokens)
    predicted = target_argmax.tolist()
    accepted = 0
    while accepted < k and predicted[accepted] == draft_tokens[accepted]:
        accepted += 1
    return accepted, int(predicted[accepted])


def sample(probs: Tensor, generator: torch.Generator) -> int:
    """One token id drawn from ``probs`` ``[V]``."""
    return int(torch.multinomial(probs, 1, generator=generator))


def speculative_accept(
    p: Tensor, q: Tensor, draft_tokens: Sequence[int], generator: torch.Generator
) -> tuple[int, int]:
    """Speculative sampling. ``p`` ``[k+1, V]`` target distributions at ``[x, d_1..d_k]``, ``q``
    ``[k, V]`` the draft distributions each ``d_i`` was sampled from (full target vocab).
    Returns (accepted count, the next token: residual sample on rejection, else the bonus)."""
    k = len(draft_tokens)
    for i, token in enumerate(draft_tokens):
        u = torch.rand((), generator=generator, device=p.device)
        if bool(u * q[i, token] < p[i, token]):  # probability min(1, p/q); q(d_i) > 0
            continue
        residual = (p[i] - q[i]).clamp_min(0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: rejection is then impossible
            residual = p[i]
        return i, sample(residual, generator)
    return k, sample(p[k], generator)
