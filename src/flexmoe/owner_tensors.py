"""Owner shared tensors at the positions sequence routing gives to one owner (flexmoe's runtime).

Why: post-trained experts change shared tensors (embeddings and LM head in BAR's SFT stage, more in
RL). A composed model can hold only one value per tensor, the merge (``flexmoe.compose_shared``), and
the merge dilutes or blends each owner's change: on the `small` post-training demo, math text routed by
hand to public + the math expert ("oracle") answers half as many math tasks as the math expert alone.
When sequence routing has chosen one owner for a position, that position can compute with the owner's
own tensors instead: the merge plus the owner's correction ``C = delta_owner - delta_merged``. A
position then sees what the owner's own model computes there (its FFN beside public, its embeddings
and head), which is the whole point of choosing one owner.

How: the composed model keeps every owner's delta file (``flexmoe_shared/NAME.safetensors``, kept for
exact opt-out). ``delta_merged`` is the merge applied to the deltas alone (every merge here is the anchor
plus a function of the deltas, so the anchor is not needed). Corrections are stored by row, only where
they are not zero (with the default ``disjoint`` merge: the rows two owners both changed). Forward hooks
on the affected ``nn.Embedding`` / ``nn.Linear`` modules add them at the chosen positions:

- embedding: ``out[p] += C[ids[p]]``;
- linear (LM head, projections): ``out[p, rows] += x[p] @ C[rows]^T``.

Memory: one row of ``H`` values per corrected row and owner (and for public alone). An owner's
correction also takes the other owners' rows out of the merge, so it covers every row any owner
changed: with owner rows and ``disjoint`` a few hundred rows per owner on the demos; with every row
(BAR's sft, ``--shared-rows all``) the whole embedding and LM head per owner.

Positions routed to public alone (sequence routing's public choice and its anchor pass) compute with
the anchor's tensors (the correction ``-delta_merged``): an owner's rows then act only where that owner
is chosen or the rows decide, which keeps opt-out local (BENCHMARKS.md, "Expert capacity"). Other changed
tensors (norm weights) keep the merge; ``OwnerTensors.merged_only`` names them. Positions the rows
decide and every model without sequence routing use the merge, so the stock export and its numbers are
unchanged. Removing an owner removes its delta file, so opt-out stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from flexmoe.compose_shared import MERGES, SHARED_DIR

PUBLIC_ALONE = -1  # ``owner_at`` where public alone is routable: the anchor's tensors


@dataclass
class Correction:
    """The nonzero rows of one owner's correction of one weight: ``rows`` ``[R]``, ``values`` ``[R, in]``."""

    rows: torch.Tensor
    values: torch.Tensor
    slot: torch.Tensor | None = None  # embeddings: per token its row in ``values``, -1 elsewhere


@dataclass
class OwnerTensors:
    """Per module name, per expert index (1..E-1), the owner's correction (see the module docstring)."""

    corrections: dict[str, dict[int, Correction]]
    merged_only: list[str] = field(default_factory=list)
    #: ``[B, S]`` (or ``[B, 1]`` in a decode step) the expert chosen alone at each position of the
    #: current call, 0 where none is; set by the runtime before each call, None: the merge everywhere.
    owner_at: torch.Tensor | None = None
    _hooks: list = field(default_factory=list, repr=False)

    def install(self, model: torch.nn.Module) -> None:
        modules = dict(model.named_modules())
        for name in self.corrections:
            module = modules[name]
            w = module.weight  # moved and cast once, not per call (bf16 models: half the memory)
            for c in self.corrections[name].values():
                c.rows, c.values = c.rows.to(w.device), c.values.to(w.device, w.dtype)
            self._hooks.append(
                module.register_forward_hook(lambda m, a, o, n=name: _correct(self, n, m, a, o))
            )

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def load_owner_tensors(
    path: Path, meta: dict, names: list[str], model: torch.nn.Module
) -> OwnerTensors | None:
    """The corrections of a composed model whose owners changed shared tensors (None when none did)."""
    merge = meta.get("shared_merge")
    files = {n: Path(path) / SHARED_DIR / f"{n}.safetensors" for n in names[1:]}
    files = {n: f for n, f in files.items() if f.is_file()}
    if not merge or not files:
        return None
    deltas = {n: load_file(str(f)) for n, f in files.items()}
    modules = dict(model.named_modules())
    out = OwnerTensors({})
    for key in sorted(set().union(*(d.keys() for d in deltas.values()))):
        module_name = key.removesuffix(".weight")
        if not key.endswith(".weight") or not isinstance(
            modules.get(module_name), (torch.nn.Embedding, torch.nn.Linear)
        ):
            out.merged_only.append(key)
            continue
        per_owner = {n: d[key].float() for n, d in deltas.items() if key in d}
        merged = MERGES[merge["method"]](
            torch.zeros_like(next(iter(per_owner.values()))), list(per_owner.values()), len(names) - 1
        )
        # each slot's own delta (public alone: none, the anchor's tensors) minus the merged one
        own = {names.index(n): per_owner.get(n, torch.zeros_like(merged)) for n in names[1:]}
        own[PUBLIC_ALONE] = torch.zeros_like(merged)
        for slot, delta in own.items():
            c = delta - merged
            rows = c.ne(0).any(1).nonzero().squeeze(1)
            if len(rows):
                out.corrections.setdefault(module_name, {})[slot] = Correction(rows, c[rows])
    if tied := _tied_head(model, out):
        out.corrections["lm_head"] = tied
    return out if out.corrections else None


def _tied_head(model, out: OwnerTensors) -> dict | None:
    """With tied embeddings the LM head is the embedding matrix: the same correction, on the output side."""
    if not getattr(model.config, "tie_word_embeddings", False) or "lm_head" in out.corrections:
        return None
    return out.corrections.get("model.embed_tokens")


def single_owner(mask: torch.Tensor) -> torch.Tensor:
    """``[..., E]`` routable-expert mask -> ``[...]`` the one routable owner (index >= 1), else 0."""
    owners = mask[..., 1:]
    alone = owners.sum(-1) == 1
    return torch.where(alone, owners.float().argmax(-1) + 1, torch.zeros_like(alone, dtype=torch.long))


def owners_at(mask: torch.Tensor | None) -> torch.Tensor | None:
    """``OwnerTensors.owner_at`` for a call routed by ``mask`` (``[B, E]`` or ``[B, S, E]``): ``[B, 1]``
    or ``[B, S]``, the one owner routable alone, ``PUBLIC_ALONE`` where no owner is (sequence routing's
    public choice and its anchor pass: the anchor's tensors), 0 elsewhere (the merge); None for an
    ``[E]`` mask (a model routed as a whole: the merge, as the stock checkpoint computes)."""
    if mask is None or mask.dim() < 2:
        return None
    one = single_owner(mask)
    at = torch.where(mask[..., 1:].any(-1), one, torch.full_like(one, PUBLIC_ALONE))
    at = at[:, None] if at.dim() == 1 else at
    return at if bool(at.any()) else None


def _positions(tensors: OwnerTensors, shape: torch.Size) -> torch.Tensor | None:
    """The chosen owner per position, aligned with an output of ``shape`` ``[B, S, ...]`` (the LM head
    may see only the last positions)."""
    at = tensors.owner_at
    if at is None:
        return None
    B, S = shape[0], shape[1]
    return at.expand(B, S) if at.shape[1] == 1 else at[:, -S:]


def _correct(tensors: OwnerTensors, name: str, module, args, out: torch.Tensor):
    """The forward hook: ``out`` with each owner's correction added at the positions given to it."""
    at = _positions(tensors, out.shape)
    if at is None:
        return None
    out = out.clone()
    add = _add_embedding if isinstance(module, torch.nn.Embedding) else _add_linear
    for j, c in tensors.corrections[name].items():
        sel = at == j
        if bool(sel.any()):
            add(out, sel, args[0], c, module)
    return out


def _add_embedding(out: torch.Tensor, sel: torch.Tensor, ids: torch.Tensor, c: Correction, module) -> None:
    """``out[p] += C[ids[p]]`` where the token's row has a correction."""
    if c.slot is None or c.slot.device != ids.device:
        c.slot = torch.full((module.num_embeddings,), -1, dtype=torch.long, device=ids.device)
        c.slot[c.rows.to(ids.device)] = torch.arange(len(c.rows), device=ids.device)
    s = torch.where(sel, c.slot[ids], -1)
    hit = s >= 0
    out[hit] += c.values.to(out.dtype)[s[hit]]


def _add_linear(out: torch.Tensor, sel: torch.Tensor, x: torch.Tensor, c: Correction, module) -> None:
    """``out[p, rows] += x[p] @ C[rows]^T``."""
    picked = out[sel]
    picked[:, c.rows] += x[sel].to(out.dtype) @ c.values.to(out.dtype).T
    out[sel] = picked
