"""The embedded federations: a broad public pool and data owners, built offline and deterministically.

``build_demo_corpora(out)`` writes::

    out/<domain>/train.jsonl   90% of the documents
    out/<domain>/valid.jsonl    5%
    out/<domain>/test.jsonl     5%
    out/tasks/<task>.jsonl     evaluation tasks built from the test split only (flexmoe.evaluate.tasks)
    out/manifest.json          federation, domains (kind, sources, documents and bytes per split), tasks,
                               flexmoe version, size_mb, seed

Each line is ``{"id": "<domain>-000123", "text": "..."}``. The default federation ``demo`` has the
domains ``public``, ``code``, ``math`` and ``legal``; its public pool holds some text of each owner's
kind from other sources or in another style (see :mod:`flexmoe.corpora.federations`). The federation
``measure`` has its own public pool and nine owners, for measurement only. Documents are de-duplicated
(exact and near) across the whole federation before they are split, so no text is in two splits or two
domains. DATA.md at the repository root describes each source, its licence and its overlap with the
public pool.

The output is byte-identical on every run and machine for one package version: generators draw only
from ``random.Random(seed).random()``, real text comes from shipped snapshots (never from the running
Python installation), and sizes are counted in UTF-8 bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

# Not "import math": importing the submodule flexmoe.corpora.math rebinds the name "math" here.
from math import isfinite
from pathlib import Path

from flexmoe import __version__
from flexmoe.corpora.dedup import Deduper
from flexmoe.corpora.federations import DEMO, FEDERATIONS, Federation, domain_documents
from flexmoe.corpora.sources import ASSETS, GENERATED
from flexmoe.errors import FlexmoeError
from flexmoe.evaluate.tasks import build_tasks
from flexmoe.fileio import atomic_dir, write_json

DOMAINS = tuple(d.name for d in DEMO.domains)  # ("public", "code", "math", "legal")
SPLITS = ("train", "valid", "test")
DEFAULT_SEED = 1234


def split_of(index: int) -> str:
    """Split of the ``index``-th document of a domain: a fixed 18/1/1 pattern in every block of 20.

    Documents arrive in random order and are distinct, so a positional rule gives exact 90/5/5
    proportions (even for tiny corpora) with no overlap between splits.
    """
    pos = index % 20
    return "valid" if pos == 18 else "test" if pos == 19 else "train"


def _domain_seed(seed: int, fed: Federation, index: int) -> int:
    """A separate, fixed seed per federation and domain (no ``hash()``, which is randomised per process)."""
    return seed * 100 + fed.seed_offset + index


def _json_line(row: dict[str, str]) -> str:
    """One JSON line, UTF-8 kept readable, but with the characters that ``str.splitlines`` treats as
    line breaks (and ``json`` leaves raw) escaped, so every reader sees exactly one row per line."""
    text = json.dumps(row, ensure_ascii=False)
    for ch in ("\u2028", "\u2029", "\x85"):
        text = text.replace(ch, f"\\u{ord(ch):04x}")
    return text + "\n"


def _write_domain(folder: Path, domain: str, docs: Iterator[str]) -> dict[str, int]:
    """Write one domain's three split files; return documents and UTF-8 text bytes per split."""
    folder.mkdir(parents=True)
    stats = {f"{s}_{k}": 0 for s in SPLITS for k in ("docs", "bytes")}
    files = {s: open(folder / f"{s}.jsonl", "w", encoding="utf-8", newline="\n") for s in SPLITS}
    try:
        for i, text in enumerate(docs):
            split = split_of(i)
            row = {"id": f"{domain}-{i:06d}", "text": text}
            files[split].write(_json_line(row))
            stats[f"{split}_docs"] += 1
            stats[f"{split}_bytes"] += len(text.encode("utf-8"))
    finally:
        for f in files.values():
            f.close()
    return stats


def build_demo_corpora(
    out: Path,
    *,
    size_mb: float | None = None,
    force: bool = False,
    seed: int = DEFAULT_SEED,
    federation: str = "demo",
    task_items: int = 100,
) -> dict[str, dict[str, int]]:
    """Write one federation's domains under ``out`` (atomically) and return their statistics.

    ``size_mb`` is the target text size per domain (train+valid+test, in units of 10**6 UTF-8 bytes;
    the federation's default when None; a domain's ``scale`` multiplies it); each domain stops at the
    first document that reaches it. A domain built from a shipped snapshot holds at most that
    snapshot. An existing ``out`` is refused unless ``force`` is set, and is replaced only once the
    new corpora are complete. ``task_items``: at most that many items per evaluation task.
    """
    if federation not in FEDERATIONS:
        raise FlexmoeError(f"Unknown federation {federation!r}.", f"use one of {', '.join(FEDERATIONS)}.")
    fed = FEDERATIONS[federation]
    size_mb = fed.size_mb if size_mb is None else size_mb
    if not (isinstance(size_mb, (int, float)) and isfinite(size_mb) and size_mb > 0):
        raise FlexmoeError(f"size_mb must be a positive number, got {size_mb!r}.", "pass e.g. size_mb=2.0.")
    if not (isinstance(task_items, int) and task_items > 0):
        raise FlexmoeError(
            f"task_items must be a positive integer, got {task_items!r}.", "pass e.g. task_items=100."
        )
    stats: dict[str, dict[str, int]] = {}
    sources: dict[str, dict[str, dict[str, int]]] = {}
    dedup = Deduper()
    with atomic_dir(Path(out), force) as tmp:
        for i, domain in enumerate(fed.domains):
            budget = int(size_mb * domain.scale * 1_000_000)
            docs, sources[domain.name] = domain_documents(domain, _domain_seed(seed, fed, i), budget, dedup)
            stats[domain.name] = _write_domain(tmp / domain.name, domain.name, iter(docs))
        tasks = build_tasks(tmp, task_items, domains={d.name: d.kind for d in fed.domains})
        manifest = _manifest(fed, stats, sources, size_mb, seed)
        write_json(tmp / "manifest.json", {**manifest, "duplicates_dropped": dedup.dropped, "tasks": tasks})
    return stats


def _manifest(
    fed: Federation, stats: dict[str, dict[str, int]], sources: dict, size_mb: float, seed: int
) -> dict:
    """The manifest: what was built, from what, and how big each split is."""
    return {
        "format": "flexmoe-demo-corpora/2",
        "federation": fed.name,
        "flexmoe_version": __version__,
        "size_mb": size_mb,
        "seed": seed,
        "domain_order": [d.name for d in fed.domains],
        "owners": list(fed.owners),
        "domains": {
            d.name: {
                "kind": d.kind,
                "about": d.about,
                "sources": sources[d.name],
                **{
                    s: {"docs": stats[d.name][f"{s}_docs"], "bytes": stats[d.name][f"{s}_bytes"]}
                    for s in SPLITS
                },
            }
            for d in fed.domains
        },
        "licenses": {**ASSETS, "gen:*": GENERATED},
        "split_rule": "document i goes to valid if i % 20 == 18, test if i % 20 == 19, else train",
        "dedup": "exact (normalised text) and near (>= 50% of sampled word 8-grams seen) across the "
        "federation; near within a domain for real text only",
        "bytes": "UTF-8 bytes of document text (not of the JSON lines)",
    }


__all__ = ["DOMAINS", "FEDERATIONS", "SPLITS", "build_demo_corpora", "split_of"]
