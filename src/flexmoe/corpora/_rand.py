"""Shared helpers of the corpus generators: a deterministic random source and a byte budget.

Python promises that ``random.Random(seed).random()`` gives the same sequence on every version and
platform, but not ``choice``, ``randint``, ``shuffle`` or ``sample`` (their algorithms have changed
between releases). Every draw here therefore goes through ``random()`` only.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


class Rand:
    """Seeded random draws built on ``random.Random.random`` alone (reproducible on Python 3.10+)."""

    def __init__(self, seed: int):
        self._rng = random.Random(seed)

    def random(self) -> float:
        """A float in [0, 1)."""
        return self._rng.random()

    def below(self, n: int) -> int:
        """An integer in [0, n)."""
        return int(self._rng.random() * n)

    def between(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi], both ends included."""
        return lo + self.below(hi - lo + 1)

    def chance(self, p: float) -> bool:
        """True with probability ``p``."""
        return self._rng.random() < p

    def pick(self, seq: Sequence[T]) -> T:
        """One element of a non-empty sequence."""
        return seq[self.below(len(seq))]

    def picks(self, seq: Sequence[T], k: int) -> list[T]:
        """``k`` distinct elements (by position) in random order."""
        pool = list(seq)
        self.shuffle(pool)
        return pool[:k]

    def shuffle(self, items: list[T]) -> None:
        """Fisher-Yates shuffle in place."""
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]


def until_budget(docs: Iterator[str], budget: int) -> Iterator[str]:
    """Distinct documents from ``docs`` until their UTF-8 size reaches ``budget`` bytes.

    Repeats are dropped: a repeated document adds nothing to learn from, and it could land in two
    splits and leak test text into training.
    """
    total = 0
    seen: set[str] = set()  # membership only, so hash order never affects the output
    for doc in docs:
        if total >= budget:
            return
        if doc in seen:
            continue
        seen.add(doc)
        total += len(doc.encode("utf-8"))
        yield doc
