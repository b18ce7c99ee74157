"""Secret canaries and their exposure (Carlini et al. 2019, "The Secret Sharer").

A canary is ``"my secret code is d d d ..."`` with ``length`` uniformly random digits: the randomness
space R holds 10^length secrets. Canaries are planted into an owner's training documents, each
repeated 1, 10 or 100 times (separate documents at random positions); control canaries are made the
same way and never planted, so they show chance level on the very same model.

Exposure of a canary s is ``log2 |R| - log2 rank(s)``, where the rank orders every secret in R by the
model's log-perplexity of its full canary text. R is too large to score, so the rank is estimated from
``N`` random secrets: with ``k`` of them scoring better than s, the rank fraction is estimated as
``(k + 1) / (N + 1)`` and exposure as ``-log2((k + 1) / (N + 1))``. It lies in [0, log2(N + 1)]; a
canary that nothing beats reaches the cap, so the true exposure is at least that. A secret the model
never saw has a uniform rank, so its expected exposure is about ``1 / ln 2 = 1.44`` bits. The
``extrapolated`` value fits a normal distribution to the N scores, as Carlini et al. do (with a
skew-normal), to go past the cap: an approximation, reported separately.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from flexmoe.errors import FlexmoeError
from flexmoe.evaluate.metrics import sequence_nll
from flexmoe.fileio import atomic_write_bytes, read_json, write_json

PREFIX = "my secret code is"


@dataclass
class Canary:
    id: str
    secret: str  # the digits, space-separated
    repeats: int  # 0: a control, never planted

    @property
    def text(self) -> str:
        return canary_text(self.secret)


def canary_text(secret: str) -> str:
    return f"{PREFIX} {secret}"


def random_secret(rng: random.Random, length: int) -> str:
    # Space-separated digits: one token per digit in BPE vocabularies, so the secret is a sequence of
    # random tokens whatever tokenizer the anchor uses.
    return " ".join(str(rng.randrange(10)) for _ in range(length))


def make_canaries(
    repeats: Sequence[int] = (1, 10, 100),
    per_repeat: int = 3,
    controls: int = 3,
    length: int = 10,
    seed: int = 0,
) -> list[Canary]:
    """``per_repeat`` canaries for each repeat count, plus ``controls`` that are never planted."""
    rng = random.Random(f"flexmoe-canaries-{seed}")
    out, seen = [], set()
    for r in repeats:
        for i in range(per_repeat):
            out.append(Canary(f"r{r}-{i}", _fresh(rng, length, seen), r))
    out += [Canary(f"control-{i}", _fresh(rng, length, seen), 0) for i in range(controls)]
    return out


def _fresh(rng: random.Random, length: int, seen: set[str]) -> str:
    while (s := random_secret(rng, length)) in seen:
        pass
    seen.add(s)
    return s


def plant(docs: Sequence[str], canaries: Sequence[Canary], seed: int = 0) -> list[str]:
    """The documents with every planted canary inserted ``repeats`` times, as separate documents at
    random positions (a fixed seed keeps the planted corpus reproducible)."""
    rng = random.Random(f"flexmoe-plant-{seed}")
    out = list(docs)
    for c in canaries:
        for _ in range(c.repeats):
            out.insert(rng.randrange(len(out) + 1), c.text)
    return out


def save_canaries(path: Path, canaries: Sequence[Canary], length: int) -> None:
    write_json(
        path,
        {
            "prefix": PREFIX,
            "length": length,
            "alphabet": "0123456789",
            "canaries": [asdict(c) for c in canaries],
        },
    )


def load_canaries(path: Path) -> tuple[list[Canary], int]:
    meta = read_json(path)
    if meta.get("prefix") != PREFIX or "canaries" not in meta:
        raise FlexmoeError(f"{path} is not a flexmoe canary file.", "pass the canaries.json an audit wrote.")
    return [Canary(**c) for c in meta["canaries"]], int(meta["length"])


def plant_jsonl(src: Path, dst: Path, canaries: Sequence[Canary], seed: int = 0) -> int:
    """Copy a ``.jsonl`` corpus with canaries planted (other rows unchanged); returns the number of
    canary documents added."""
    rows = [x for x in Path(src).read_text(encoding="utf-8").splitlines() if x.strip()]
    rng = random.Random(f"flexmoe-plant-{seed}")
    added = 0
    for c in canaries:
        for i in range(c.repeats):
            line = json.dumps({"id": f"canary-{c.id}-{i}", "text": c.text})
            rows.insert(rng.randrange(len(rows) + 1), line)
            added += 1
    atomic_write_bytes(Path(dst), "".join(r + "\n" for r in rows).encode())
    return added


def text_nll(lm, texts: Sequence[str], batch_size: int = 256) -> list[float]:
    """Total negative log-likelihood (nats) of each text's tokens after the first."""
    return sequence_nll(lm, lm.tokenizer(list(texts))["input_ids"], batch_size)[0].tolist()


def exposure_from_scores(canary_nll: float, candidate_nll: Sequence[float], space_bits: float) -> dict:
    """Exposure of one canary given the NLLs of N random candidates (lower NLL ranks higher)."""
    n = len(candidate_nll)
    k = sum(c < canary_nll for c in candidate_nll)
    estimate = -math.log2((k + 1) / (n + 1))
    mu = sum(candidate_nll) / n
    sd = math.sqrt(sum((c - mu) ** 2 for c in candidate_nll) / max(1, n - 1))
    # P(a random secret scores better) under a normal fit, floored at one secret in R.
    tail = 0.5 * math.erfc((mu - canary_nll) / (sd * math.sqrt(2))) if sd > 0 else 0.5
    extrapolated = min(space_bits, -math.log2(max(tail, 2.0**-space_bits)))
    return {"exposure": estimate, "at_cap": k == 0, "beaten_by": k, "extrapolated": extrapolated}


def exposure(lm, canaries: Sequence[Canary], length: int, candidates: int = 1000, seed: int = 0) -> dict:
    """Exposure of every canary under ``lm``, and the mean per repeat count (0 = controls)."""
    rng = random.Random(f"flexmoe-candidates-{seed}")
    taken = {c.secret for c in canaries}
    pool = []
    while len(pool) < candidates:
        s = random_secret(rng, length)
        if s not in taken:
            pool.append(s)
    scores = text_nll(lm, [canary_text(s) for s in pool] + [c.text for c in canaries])
    cand, own = scores[:candidates], scores[candidates:]
    bits = length * math.log2(10)
    per = {
        c.id: {"repeats": c.repeats, **exposure_from_scores(s, cand, bits)}
        for c, s in zip(canaries, own, strict=True)
    }
    groups: dict[int, list[float]] = {}
    for r in per.values():
        groups.setdefault(r["repeats"], []).append(r["exposure"])
    return {
        "canaries": per,
        "mean_by_repeats": {str(r): sum(v) / len(v) for r, v in sorted(groups.items())},
        "candidates": candidates,
        "cap_bits": math.log2(candidates + 1),
        "space_bits": bits,
        "chance_bits": 1 / math.log(2),
    }
