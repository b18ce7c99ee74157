"""Routing statistics: a few numbers per layer that an owner computes on its own machine, and the
public statistics the maintainer publishes with the anchor. Compose-time routing methods
(``flexmoe.routing_methods``) turn them into router rows without anyone seeing anyone else's data.

Owner side (``owner_stats``), computed in the owner's own 2-expert model {anchor FFN, own expert} (the
model its row was trained in) on its held-out (validation) documents and on public training text:

- ``layers.{L}.mean_own`` ``[H]``: mean router input on its own held-out tokens (a class mean for
  Gaussian/LDA routing);
- ``layers.{L}.margin_own`` / ``layers.{L}.margin_public`` ``[2]``: mean and standard deviation of its
  trained routing margin ``r_own.h + b_own - r_pub.h`` on its own tokens and on public tokens (what
  "mine" and "public" mean for this row, for logit calibration);
- ``tokens`` ``[2]``: how many own and public tokens those numbers come from.

They are written beside the package as ``routing_stats.safetensors`` + ``routing_stats.json`` (which
records the SHA-256 of the tensors, the package's and the data's fingerprints). The package itself is
unchanged. Means of thousands of tokens per layer are what is published: no document, and no
statistic of fewer than ``MIN_TOKENS`` tokens.

Maintainer side (``anchor_stats``), from the anchor alone on public training text, written next to the
anchor as ``flexmoe_routing_anchor.safetensors``: per layer the public mean router input ``mean``
``[H]``, the covariance ``cov`` ``[H, H]``, and ``const`` ``[H]``: the direction ``u`` along which the
router input is most nearly constant (``u = S^-1 mu / mu' S^-1 mu``, so ``u.h`` has mean 1 and the
smallest possible variance on public text). A router bias ``b`` can ride on it: ``b * u`` added to a
row gives ``b * u.h``, which is ``b`` up to the spread ``cv`` (``const_cv``) of ``u.h``. That is how
methods that need a bias fold into the bias-free rows of the stock export.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flexmoe.anchor import fingerprint, load_anchor, resolve
from flexmoe.data import blocks_for, data_fingerprint, load_splits
from flexmoe.errors import FlexmoeError
from flexmoe.expert.package import MANIFEST, STATS_FILE, STATS_META, TENSOR_FILE
from flexmoe.expert.stages import expert_model
from flexmoe.fileio import read_json, sha256_file, write_json
from flexmoe.moe import decoder_layers, moe_blocks
from flexmoe.router_init import RouterInputs, sample_docs
from flexmoe.tokenizer import load_tokenizer

OWNER_FILE = STATS_FILE
OWNER_META = STATS_META
ANCHOR_FILE = "flexmoe_routing_anchor.safetensors"
MIN_TOKENS = 1024  # no statistic is published from fewer tokens than this
MAX_BLOCKS = 64
# Covariance shrinkage towards the mean variance of the layer. 1e-3 let the owners' means (measured in
# their 2-expert models) and the public covariance (the anchor alone) disagree in directions where
# public text hardly varies, and LDA margins blew up there (BENCHMARKS.md, "Routing methods").
RIDGE = 0.1


@torch.no_grad()
def layer_inputs(model, modules, blocks: torch.Tensor, batch: int = 8):
    """Yield, per batch of ``blocks``, the list of per-layer router inputs ``[tokens, H]`` (float64)."""
    cap = RouterInputs(modules)
    device = next(model.parameters()).device
    try:
        model.eval()
        for s in range(0, len(blocks), batch):
            model(input_ids=blocks[s : s + batch].to(device))
            yield [h.reshape(-1, h.shape[-1]).double().cpu() for h in cap.seen]
    finally:
        cap.close()


def _margins(block, h: torch.Tensor) -> torch.Tensor:
    """Trained margin of the owner's row over the public row: ``r_own.h + b_own - r_pub.h``."""
    pub, own = block.router[0], block.router[1]
    return h @ (own.weight.double() - pub.weight.double()).view(-1) + float(own.bias)


@torch.no_grad()
def owner_stats(model, own_blocks: torch.Tensor, public_blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Statistics of one owner's trained 2-expert model on its own held-out and on public blocks."""
    blocks = moe_blocks(model)
    out: dict[str, torch.Tensor] = {}
    counts = []
    for kind, data in (("own", own_blocks[:MAX_BLOCKS]), ("public", public_blocks[:MAX_BLOCKS])):
        n = data.numel()
        if n < MIN_TOKENS:
            raise FlexmoeError(
                f"Only {n} {kind} tokens for routing statistics (at least {MIN_TOKENS} needed).",
                "give more validation data (own) or public data.",
            )
        counts.append(n)
        sums = [torch.zeros(b.router[0].weight.shape[-1], dtype=torch.float64) for b in blocks]
        margins: list[list[torch.Tensor]] = [[] for _ in blocks]
        for hs in layer_inputs(model, blocks, data):
            for i, h in enumerate(hs):
                sums[i] += h.sum(0)
                margins[i].append(_margins(blocks[i], h))
        for i in range(len(blocks)):
            m = torch.cat(margins[i])
            out[f"layers.{i}.margin_{kind}"] = torch.stack([m.mean(), m.std()]).float()
            if kind == "own":
                out[f"layers.{i}.mean_own"] = (sums[i] / n).float()
    out["tokens"] = torch.tensor(counts, dtype=torch.float32)
    return out


def write_owner_stats(package: Path, stats: dict[str, torch.Tensor], record: dict) -> dict:
    """Write the statistics beside a package; the record holds their hash and the package's."""
    package = Path(package)
    tmp = package / f".{OWNER_FILE}.tmp"
    save_file({k: v.contiguous() for k, v in stats.items()}, str(tmp), metadata={"format": "pt"})
    tmp.replace(package / OWNER_FILE)
    record = {
        **record,
        "format": "flexmoe-routing-stats/1",
        "package_sha256": {
            TENSOR_FILE: sha256_file(package / TENSOR_FILE),
            MANIFEST: sha256_file(package / MANIFEST),
        },
        "sha256": sha256_file(package / OWNER_FILE),
        "tensors": sorted(stats),
    }
    write_json(package / OWNER_META, record)
    return record


def load_owner_stats(package: Path) -> dict[str, torch.Tensor] | None:
    """A package's routing statistics, checked against their recorded hash and the package; None if
    the owner shipped none."""
    package = Path(package)
    if not (package / OWNER_FILE).is_file():
        return None
    rec = read_json(package / OWNER_META)
    if (
        sha256_file(package / OWNER_FILE) != rec["sha256"]
        or sha256_file(package / TENSOR_FILE) != rec["package_sha256"][TENSOR_FILE]
    ):
        raise FlexmoeError(
            f"{package}: {OWNER_FILE} does not match its record or its package (stale or tampered).",
            "ask the owner to recompute them: flexmoe expert stats PACKAGE --data DIR --public DIR.",
        )
    return load_file(str(package / OWNER_FILE))


def compute_for_package(
    anchor: Path, package: Path, data: Sequence[Path], public: Sequence[Path], seq_len: int | None = None
) -> dict:
    """The owner's side, on its own machine: rebuild its 2-expert model from the anchor and its package,
    measure on its own validation split and public training text, write the statistics beside it."""

    anchor = resolve(anchor)
    manifest = read_json(Path(package) / "expert.json")
    seq_len = seq_len or manifest.get("training", {}).get("seq_len", 256)
    # The model the owner trained: its FFN, router rows and bias, and the shared deltas of post-training.
    model = expert_model(anchor, Path(package))[0].eval()
    tok = load_tokenizer(anchor)
    own = load_splits(list(data)).valid  # held-out documents: never the test split
    pub = load_splits(list(public)).train
    stats = owner_stats(model, blocks_for(own, tok, seq_len), blocks_for(_spread(pub), tok, seq_len))
    record = {
        "name": manifest["name"],
        "seq_len": seq_len,
        "own": {"split": "valid", "fingerprint": data_fingerprint(own)},
        "public": {"split": "train", "fingerprint": data_fingerprint(pub)},
    }
    return write_owner_stats(package, stats, record)


def _spread(docs: Sequence[str], n: int = 400) -> list[str]:
    return sample_docs(docs, n)


# --------------------------------------------------------------------------------------------------
# Maintainer side: public statistics published with the anchor


@torch.no_grad()
def anchor_stats(model, public_blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per layer: public mean, covariance, the most nearly constant direction and its spread."""
    mlps = [layer.mlp for layer in decoder_layers(model)]
    H = model.config.hidden_size
    n, s1 = 0, [torch.zeros(H, dtype=torch.float64) for _ in mlps]
    s2 = [torch.zeros(H, H, dtype=torch.float64) for _ in mlps]
    for hs in layer_inputs(model, mlps, public_blocks[:MAX_BLOCKS]):
        n += len(hs[0])
        for i, h in enumerate(hs):
            s1[i] += h.sum(0)
            s2[i] += h.T @ h
    out: dict[str, torch.Tensor] = {}
    for i in range(len(mlps)):
        mu = s1[i] / n
        cov = s2[i] / n - torch.outer(mu, mu)
        u, cv = constant_direction(mu, cov)
        out[f"layers.{i}.mean"], out[f"layers.{i}.cov"] = mu, cov
        out[f"layers.{i}.const"], out[f"layers.{i}.const_cv"] = u, torch.tensor(cv, dtype=torch.float64)
    out["tokens"] = torch.tensor(float(n), dtype=torch.float64)
    return out


def regularised(cov: torch.Tensor) -> torch.Tensor:
    return cov + RIDGE * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)


def constant_direction(mu: torch.Tensor, cov: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``u`` with ``E[u.h] = 1`` and the least variance of ``u.h``; and that spread (std / mean)."""
    a = torch.linalg.solve(regularised(cov), mu)
    q = float(mu @ a)  # Mahalanobis norm^2 of the mean
    u = a / q
    return u, float((u @ cov @ u).clamp_min(0).sqrt())


def publish_anchor_stats(anchor: Path, public: Sequence[Path], seq_len: int = 256) -> dict:
    """Compute and write the public statistics next to the anchor (public training text only)."""

    anchor = resolve(anchor)
    docs = load_splits(list(public)).train
    stats = anchor_stats(load_anchor(anchor), blocks_for(_spread(docs), load_tokenizer(anchor), seq_len))
    meta = {
        "anchor_fingerprint": fingerprint(anchor),
        "public_fingerprint": data_fingerprint(docs),
        "tokens": int(stats["tokens"]),
        "seq_len": seq_len,
        "const_cv": [float(stats[f"layers.{i}.const_cv"]) for i in range(_layers(stats))],
    }
    tmp = anchor / f".{ANCHOR_FILE}.tmp"
    save_file(
        {k: v.contiguous() for k, v in stats.items()},
        str(tmp),
        metadata={"format": "pt", "inputs_sha256": hashlib.sha256(repr(meta).encode()).hexdigest()},
    )
    tmp.replace(anchor / ANCHOR_FILE)  # atomic: a reader sees the old file or the new one
    return meta


def load_anchor_stats(anchor: Path) -> dict[str, torch.Tensor] | None:
    f = Path(anchor) / ANCHOR_FILE
    return load_file(str(f)) if f.is_file() else None


def _layers(stats: dict[str, torch.Tensor]) -> int:
    return len({k.split(".")[1] for k in stats if k.startswith("layers.")})
