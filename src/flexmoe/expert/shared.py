"""Shared (anchor) tensors an owner may change, and the deltas it ships for them.

Why owners change shared tensors at all: an expert FFN alone cannot make a token the anchor barely saw
predictable. On the tiny demo federation the math owner's FFN reaches a held-out perplexity of 30-43
where the anchor fully fine-tuned reaches 6.1; training the embedding and LM-head rows as well reaches
7.6, and only the rows of the owner's own tokens (182 of 4,096) 9.5 (BENCHMARKS.md, "Expert capacity").

Owner rows keep FlexOlmo's guarantees: a token's rows are the owner's when the token is frequent in the
owner's data and rare in public data, so owners' rows barely overlap, the ``disjoint`` merge of
``flexmoe.compose_shared`` keeps each owner's change whole in the stock checkpoint, and removing an
owner removes its rows exactly. The row choice is computed from the owner's data and public data only.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from flexmoe.anchor import iter_tensors
from flexmoe.errors import FlexmoeError

EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")
# Attention projections an owner may also train (``--shared-attention``): served per owner only by
# flexmoe's runtime under sequence routing, where a chosen owner's positions compute with its own.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
SHARED_ROWS = ("none", "owner", "all")
# A token's rows are the owner's when its frequency in the owner's data is at least this many times its
# frequency in public data (add-one smoothed) and it occurs at least OWNER_ROW_MIN_COUNT times.
OWNER_ROW_RATIO = 4.0
OWNER_ROW_MIN_COUNT = 3


def check_mode(mode: str) -> None:
    """Refuse an unknown ``--shared-rows`` value."""
    if mode not in SHARED_ROWS:
        raise FlexmoeError(f"Unknown --shared-rows {mode!r}.", f"use one of {', '.join(SHARED_ROWS)}.")


def token_counts(ids: Iterable[int] | torch.Tensor, vocab: int) -> torch.Tensor:
    """How often each token id occurs, ``[vocab]`` float64."""
    t = ids.flatten().long() if isinstance(ids, torch.Tensor) else torch.tensor(list(ids), dtype=torch.long)
    return torch.bincount(t, minlength=vocab)[:vocab].double()


def owner_token_rows(
    own: torch.Tensor, public: torch.Tensor, ratio: float, special: Iterable[int]
) -> torch.Tensor:
    """Bool ``[vocab]``: tokens at least ``OWNER_ROW_MIN_COUNT`` times in the owner's counts and at
    least ``ratio`` times as frequent there as in public (add-one smoothed); special tokens never (they
    belong to the anchor's template)."""
    vocab = len(own)
    share_public = (public + 1) / (public.sum() + vocab)
    rows = (own >= OWNER_ROW_MIN_COUNT) & (own / own.sum().clamp_min(1) >= ratio * share_public)
    rows[[i for i in special if i < vocab]] = False
    return rows


def train_rows(model: torch.nn.Module, rows: torch.Tensor | None) -> None:
    """Make the embedding and LM head trainable, at least fp32 (a bf16 anchor's copy is promoted), with
    the gradient of every row outside ``rows`` zeroed (None: every row) so that AdamW (no weight decay)
    leaves those rows bit for bit as the anchor has them."""
    named = dict(model.named_parameters())  # tied embeddings appear once, under the embedding's name
    for name in EMBEDDINGS:
        p = named.get(name)
        if p is None:
            continue
        _make_trainable(p)
        if rows is not None:
            keep = rows.to(p.device, p.dtype)[:, None]
            p.register_hook(lambda g, keep=keep: g * keep)


def attention_names(model: torch.nn.Module) -> tuple[str, ...]:
    """The attention projection weights of every decoder layer (norms stay frozen: the runtime cannot
    give a position its owner's norm)."""
    return tuple(
        n
        for n, _ in model.named_parameters()
        if ".self_attn." in n and n.endswith(tuple(f"{p}.weight" for p in ATTENTION_PROJECTIONS))
    )


def train_attention(model: torch.nn.Module) -> None:
    """Make every attention projection trainable, at least fp32 (as ``train_rows``)."""
    named = dict(model.named_parameters())
    for name in attention_names(model):
        _make_trainable(named[name])


def _make_trainable(p: torch.nn.Parameter) -> None:
    """Trainable in at least fp32: a bf16 / fp16 anchor's copy is promoted (optimizer precision)."""
    if p.dtype in (torch.bfloat16, torch.float16):
        p.data = p.data.float()
    p.requires_grad_(True)


def model_name(anchor_name: str) -> str:
    """An anchor tensor's name inside the 2-expert model (the anchor FFN is expert 0)."""
    return anchor_name.replace(".mlp.", ".mlp.experts.0.") if ".mlp." in anchor_name else anchor_name


def shared_deltas(model, anchor_dir: Path, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Every shared (anchor) tensor the model changed (of ``names``; None: all), as ``trained - anchor``
    in fp32. Name the trained tensors when frozen ones may be held in bf16 (expert training on a GPU)."""
    params = dict(model.named_parameters())
    out = {}
    for name, base in iter_tensors(anchor_dir):
        now = params.get(model_name(name))
        if now is None or (names is not None and name not in names):
            continue
        d = now.detach().float().cpu() - base.float()
        if bool(d.any()):
            out[name] = d.contiguous()
    return out


def stray_rows(deltas: dict[str, torch.Tensor], rows: torch.Tensor | None) -> list[str]:
    """The embedding / LM-head deltas that touch a row outside ``rows`` (none when every row may train)."""
    if rows is None:
        return []
    return [n for n in EMBEDDINGS if n in deltas and bool(deltas[n][~rows.cpu()].any())]
