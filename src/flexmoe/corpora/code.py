"""The ``code`` domain: real Python source code from the CPython standard library.

The documents (top-level functions, classes and module chunks of a few KB) were cut from CPython's
``Lib/`` by ``scripts/snapshot_corpora.py`` and ship xz-compressed in ``flexmoe/assets/code.jsonl.xz``
(about 3 MB of text, PSF License 2.0; see DATA.md and ``assets/LICENSE-PSF.txt``). Building the
corpus only decompresses that asset, so it is identical on every Python version; the live
installation is never read.
"""

from __future__ import annotations

import json
import lzma
from collections.abc import Iterator
from importlib import resources

from flexmoe.corpora._rand import Rand, until_budget

ASSET = "assets/code.jsonl.xz"


def snapshot() -> list[dict[str, str]]:
    """All rows of the shipped snapshot (``source`` and ``text``), in their stored (path) order."""
    data = resources.files("flexmoe").joinpath(ASSET).read_bytes()
    return [json.loads(line) for line in lzma.decompress(data).decode("utf-8").splitlines()]


def snapshot_bytes() -> int:
    """UTF-8 size of all code text available: the most that the code domain can hold."""
    return sum(len(row["text"].encode("utf-8")) for row in snapshot())


def generate(seed: int, budget: int) -> Iterator[str]:
    """Snapshot documents in a seeded random order until about ``budget`` bytes of UTF-8 text.

    Shuffling (rather than taking files alphabetically) spreads a small budget over many modules.
    When the budget exceeds the snapshot, the whole snapshot is returned and no more.
    """
    docs = [row["text"] for row in snapshot()]
    Rand(seed).shuffle(docs)
    return until_budget(iter(docs), budget)
