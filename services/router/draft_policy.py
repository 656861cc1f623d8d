"""How long a draft pays, as plain arithmetic: the router picks each sequence's draft length
with it, and the performance model predicts speculative decoding's tokens/s with it."""

from __future__ import annotations

POSITION_COST = 0.1  # one more position in a step, as a share of a one-token step's time (bus-bound)
PROBE_EVERY = 32  # steps a sequence that stopped drafting waits before it tries one token again
DECAY = 0.9  # weight of the older acceptance evidence per verify step


def tokens_per_step(alpha: float, k: int) -> float:
    """Expected tokens a verify step yields with k drafts, each kept with probability alpha
    once the ones before it were: 1 + alpha + ... + alpha^k."""
    return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def choose_k(alpha: float, k_max: int, cost: float = POSITION_COST) -> int:
    """The draft length with the most tokens per unit of step time; 0 when drafting does not pay."""
    return max(range(k_max + 1), key=lambda k: (tokens_per_step(alpha, k) / (1 + cost * k), -k))
