"""How much each owner's text overlaps the public pool of its federation (the numbers in DATA.md).

For every owner ``d`` of a built federation directory:

- ``public_kind_share``: the share of the public pool's bytes whose source is of ``d``'s kind of text
  (``label`` of the sources in the manifest: python, math, legal, ...);
- ``word_cov_public``: the share of the words of ``d``'s test split that occur in the public train split;
- ``ngram_cov_public``: the same for word 4-grams, the sharper measure of shared phrasing;
- ``ngram_cov_own``: 4-gram coverage by ``d``'s own train split (how predictable the owner is from its
  own data: the ceiling that the public pool is compared with);
- ``closest_owner`` / ``ngram_cov_closest``: the other owner whose train split covers ``d``'s test
  split best, and how well (the overlapping pair of the ``measure`` federation shows up here).

Words are lower-cased words and numbers (:func:`flexmoe.corpora.dedup.normalise`); coverage counts
occurrences, not distinct n-grams.
"""

from __future__ import annotations

import json
from pathlib import Path

from flexmoe.corpora.dedup import normalise
from flexmoe.errors import FlexmoeError

N = 4


def _texts(path: Path) -> list[str]:
    return [
        json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def _grams(texts: list[str], n: int) -> list[tuple[str, ...]]:
    out = []
    for t in texts:
        w = normalise(t)
        out.extend(tuple(w[i : i + n]) for i in range(len(w) - n + 1))
    return out


def coverage(target: list[str], reference: list[str], n: int) -> float:
    """Share of the word n-gram occurrences of ``target`` that occur anywhere in ``reference``."""
    grams = _grams(target, n)
    if not grams:
        return 0.0
    ref = set(_grams(reference, n))
    return sum(g in ref for g in grams) / len(grams)


def overlap_report(data_dir: Path) -> dict[str, dict]:
    """Overlap numbers for every owner of a federation directory written by ``build_demo_corpora``."""
    data_dir = Path(data_dir)
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FlexmoeError(f"{data_dir} has no manifest.json.", "build it with: flexmoe data demo --out DIR")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    domains = manifest["domains"]
    owners = [d for d in manifest["domain_order"] if d != "public"]
    train = {d: _texts(data_dir / d / "train.jsonl") for d in manifest["domain_order"]}
    sets = {d: set(_grams(texts, N)) for d, texts in train.items()}
    public_words = {w for t in train["public"] for w in normalise(t)}
    pub_sources = domains["public"].get("sources", {}).values()  # absent in corpora before federations
    pub_bytes = sum(s["bytes"] for s in pub_sources) or 1
    report = {}
    for d in owners:
        test = _texts(data_dir / d / "test.jsonl")
        grams = _grams(test, N)
        words = [w for t in test for w in normalise(t)]
        labels = {s["label"] for s in domains[d].get("sources", {}).values()}
        cov = {e: sum(g in sets[e] for g in grams) / max(1, len(grams)) for e in sets}
        others = {e: c for e, c in cov.items() if e not in (d, "public")}
        closest = max(sorted(others), key=lambda e: others[e]) if others else None
        report[d] = {
            "docs": sum(domains[d][s]["docs"] for s in ("train", "valid", "test")),
            "bytes": sum(domains[d][s]["bytes"] for s in ("train", "valid", "test")),
            "words": sum(
                len(normalise(t)) for s in ("train", "valid", "test") for t in _split(data_dir, d, s)
            ),
            "public_kind_share": sum(s["bytes"] for s in pub_sources if s["label"] in labels) / pub_bytes,
            "word_cov_public": sum(w in public_words for w in words) / max(1, len(words)),
            "ngram_cov_public": cov["public"],
            "ngram_cov_own": cov[d],
            "closest_owner": closest,
            "ngram_cov_closest": others.get(closest, 0.0) if closest else 0.0,
        }
    return report


def _split(data_dir: Path, domain: str, split: str) -> list[str]:
    return _texts(data_dir / domain / f"{split}.jsonl")


def markdown(report: dict[str, dict]) -> str:
    """The report as a Markdown table (one row per owner)."""
    rows = [
        "| owner | documents | bytes | words | public share of its kind | word coverage by public | "
        "4-gram coverage by public | by own train | closest other owner (4-gram coverage) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d, r in report.items():
        closest = f"{r['closest_owner']} ({r['ngram_cov_closest']:.1%})" if r["closest_owner"] else "-"
        rows.append(
            f"| {d} | {r['docs']:,} | {r['bytes']:,} | {r['words']:,} | {r['public_kind_share']:.1%} | "
            f"{r['word_cov_public']:.1%} | {r['ngram_cov_public']:.1%} | {r['ngram_cov_own']:.1%} | "
            f"{closest} |"
        )
    return "\n".join(rows) + "\n"
