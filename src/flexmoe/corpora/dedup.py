"""Exact and near-duplicate filtering across the documents of a whole federation.

Exact: a hash of the normalised text (lower case, words and numbers only, single spaces), so copies that
differ in case, whitespace or punctuation count as one. Near: a document whose sampled word 8-grams
were mostly seen before is dropped. Across domains this applies to every document (an owner's document
that the public pool already holds in near-identical form is not the owner's own); within a domain it
applies to real text only, because template-generated documents share sentences by design, while two
near-identical real documents (a licence with another copyright line) could land in train and test.
"""

from __future__ import annotations

import hashlib
import re
import zlib

WORD = re.compile(r"[^\W_]+")
SHINGLE = 8  # words per n-gram
SAMPLE = 4  # keep the n-grams whose hash is divisible by this (a fixed, content-defined sample)
NEAR = 0.5  # share of a document's sampled n-grams already seen that makes it a near-duplicate


def normalise(text: str) -> list[str]:
    """Lower-cased words and numbers of a text."""
    return WORD.findall(text.lower())


def shingles(words: list[str]) -> set[int]:
    """A content-defined sample of the hashed word 8-grams (crc32: fast and the same in every process)."""
    out = set()
    for i in range(len(words) - SHINGLE + 1):
        h = zlib.crc32(" ".join(words[i : i + SHINGLE]).encode("utf-8"))
        if h % SAMPLE == 0:
            out.add(h)
    return out


class Deduper:
    """Remembers every kept document; ``keep`` says whether a new one is new enough to keep."""

    def __init__(self) -> None:
        self._exact: set[bytes] = set()
        self._owner: dict[int, str] = {}  # sampled n-gram -> the first domain that held it
        self.dropped: dict[str, int] = {}

    def keep(self, text: str, domain: str, within: bool) -> bool:
        """Keep ``text`` for ``domain`` unless it (nearly) repeats a kept document.

        ``within``: also compare with the domain's own documents (real text), not only other domains'.
        """
        words = normalise(text)
        key = hashlib.blake2b(" ".join(words).encode("utf-8"), digest_size=16).digest()
        grams = shingles(words)
        if key in self._exact or self._near(grams, domain, within):
            self.dropped[domain] = self.dropped.get(domain, 0) + 1
            return False
        self._exact.add(key)
        for g in grams:
            self._owner.setdefault(g, domain)
        return True

    def _near(self, grams: set[int], domain: str, within: bool) -> bool:
        if not grams:
            return False
        owners = [self._owner.get(g) for g in grams]
        seen = sum(o is not None and (within or o != domain) for o in owners)
        return seen >= NEAR * len(grams)
