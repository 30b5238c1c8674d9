"""Exponential backoff with jitter."""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """How retryable failures are retried.

    Attempt ``n`` (1-based) waits a random time in ``[cap/2, cap]`` with
    ``cap = min(max_backoff, initial_backoff * multiplier ** (n - 1))``, and
    at least as long as the server asked (its ``RetryInfo`` or ``Retry-After``
    pushback; the server's word wins over ``max_backoff``).
    """

    max_retries: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoff must be >= 0 and multiplier >= 1")

    def delay(self, attempt: int, rng: random.Random | None = None, pushback: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (1 = first retry);
        ``pushback``: the delay the server asked for, if any."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier ** max(0, attempt - 1))
        half = cap / 2
        return max(half + (rng or random).uniform(0, half), pushback or 0.0)
