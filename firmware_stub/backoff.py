"""Reconnect delays: exponential backoff with full jitter.

Where it sits in a message's journey (see ``shared/DESIGN.md``): between the box and the broker,
when the link is down. Fifty boxes that lost the broker at the same moment must not all knock at
the same moment when it comes back: each waits a random time in ``[0, min(cap, base * 2**n))``
("full jitter", as in the AWS architecture blog's *Exponential Backoff And Jitter*). paho's own
``loop_start`` backoff doubles a fixed delay with no jitter, so the firmware does not use it.
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Delays for successive failed connection attempts; :meth:`reset` after a success.

    ``base`` (0.5 s) is the ceiling of the first delay, ``cap`` (30 s) the largest ceiling.
    ``rng`` may be injected (seeded) so tests and simulations are reproducible.
    """

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> None:
        if base <= 0 or cap < base:
            raise ValueError(f"need 0 < base <= cap, got base={base}, cap={cap}")
        self.base = base
        self.cap = cap
        self.rng = rng if rng is not None else random.Random()
        self.attempts = 0

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        # 2**attempts overflows floats only after ~1000 attempts; the min() keeps it bounded.
        return min(self.cap, self.base * 2.0 ** min(self.attempts, 64))

    def next_delay(self) -> float:
        """The delay before the next attempt (and count this attempt as failed)."""
        delay = self.rng.uniform(0.0, self.ceiling())
        self.attempts += 1
        return delay

    def reset(self) -> None:
        """The connection succeeded: the next failure starts from ``base`` again."""
        self.attempts = 0
