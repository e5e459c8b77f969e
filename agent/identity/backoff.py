"""Exponential backoff with full jitter, so agents retrying a CA that is away do not retry in lockstep."""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, initial: float = 0.5, maximum: float = 30.0, factor: float = 2.0) -> None:
        self._initial = initial
        self._maximum = maximum
        self._factor = factor
        self.attempts = 0

    def next_delay(self) -> float:
        ceiling = min(self._maximum, self._initial * self._factor**self.attempts)
        self.attempts += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempts = 0
