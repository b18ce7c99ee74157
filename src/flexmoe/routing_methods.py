"""Routing methods applied at compose time: named, deterministic strategies that turn the owners'
trained router rows (and the statistics they chose to ship) into the composed model's router.

Every method maps ``(trained rows [E, H], trained biases [E])`` of each layer, the owners' statistics
(``flexmoe.routing_stats``) and the anchor's public statistics to new rows and biases. Nothing else is
read: no owner's data, no other owner's statistics than what it shipped. The result is recomputed from
what remains whenever the expert set changes (``remove``/``add``/``update``), so a removed owner leaves
no trace in the others' rows.

Methods (``--routing NAME``; ``NAME+prior`` adds ``log(owners)`` to the public logit, so that public
text keeps the anchor's share it had in each owner's 2-expert training although n owners now compete
for it):

- ``trained``: the rows as trained (today's default); the learned biases are kept beside the weights.
- ``phatgoose``: PHATGOOSE-style standardisation: rows centred and scaled to unit standard deviation
  across dimensions, router inputs centred across dimensions (folds into the rows exactly) and divided
  by their typical standard deviation on public text (a per-layer constant: the per-token division of
  the original does not fold into linear rows), logits divided by sqrt(H).
- ``calibrated``: each owner's margin over the public row, ``m = (r_i - r_pub).h + b_i``, is mapped
  affinely so that its mean on the owner's own held-out text and on public text land on the same two
  values for every owner (the owners' averages): ``r_i' = r_pub + a_i (r_i - r_pub)`` (the scale folds
  into the row) and ``b_i' = a_i b_i + c_i`` (the offset is a bias).
- ``gated`` (``gated@LAMBDA``, default 1): the trained rows plus ``LAMBDA`` times each owner's LDA
  margin over public, centred so that its mean on the owner's own held-out text is zero: on its own
  text an owner keeps the weights its FFN was trained to be mixed at; on other text its claim shrinks.
- ``exclusive`` (``exclusive@K``, default 1): the trained rows, each owner's row lowered where, on
  another owner's mean router input, it outscores that owner's row: the margin is pushed to ``-K``
  standard deviations (on public text), by the change of least public variance that keeps the row's
  logit on its own mean and on the public mean. (Measured: no better than ``trained``; intrusion
  happens on single tokens, not on the means. ``flexmoe.sequence_routing`` addresses it at inference.)
- ``lda``: Gaussian classes with a shared covariance: ``logit_i = mu_i' S^-1 h - mu_i' S^-1 mu_i / 2``
  with owner means ``mu_i`` (shipped), the public mean ``mu_0`` and covariance ``S`` (published with the
  anchor). Linear in h; the constant is a bias.

Biases: ``bias="fold"`` (default for every method but ``trained``) folds each bias ``b`` into the row as
``b * u`` with ``u`` the anchor's nearly constant direction (``stats.constant_direction``), so the
stock export computes it up to ``b * (u.h - 1)``; ``bias="keep"`` writes bias-free rows and keeps the
biases in ``flexmoe_bias.safetensors`` (exact in flexmoe's runtime with ``use_bias``, dropped by the
stock export). Biases are shifted per layer so the largest is 0 (softmax and top-k are invariant to a
common shift; flexmoe's runtime holds only non-positive biases).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flexmoe.errors import FlexmoeError
from flexmoe.routing_stats import load_owner_stats, regularised

METHODS = ("trained", "phatgoose", "calibrated", "lda", "gated", "exclusive")
BIAS_MODES = ("fold", "keep")
DEFAULT = "trained"
ROUTING_FILE = "flexmoe_routing.safetensors"
MAX_SCALE = 10.0  # calibrated: the most a row's margin is stretched or shrunk


@dataclass
class Inputs:
    """Everything a method may use: per layer trained rows ``[E, H]`` and biases ``[E]`` (expert 0 =
    public), each owner's shipped statistics by name, and the anchor's public statistics."""

    names: list[str]
    rows: list[torch.Tensor]
    biases: list[torch.Tensor]
    owner: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    anchor: dict[str, torch.Tensor] | None = None


def parse(spec: str) -> tuple[str, bool]:
    """``"lda+prior"`` -> ``("lda", True)``; ``gated@0.5`` -> ``("gated", False)``; refuses unknown
    names."""
    base, _, extra = spec.partition("+")
    base = base.split("@")[0]
    if (
        base not in METHODS
        or extra not in ("", "prior")
        or (base not in ("gated", "exclusive") and "@" in spec)
    ):
        raise FlexmoeError(
            f"Unknown routing method {spec!r}.", f"use one of {', '.join(METHODS)} (optionally NAME+prior)."
        )
    return base, extra == "prior"


def needs(method: str) -> tuple[bool, bool]:
    """(owner statistics needed, anchor statistics needed)."""
    return method in ("calibrated", "lda", "gated", "exclusive"), method in (
        "phatgoose",
        "lda",
        "gated",
        "exclusive",
    )


def strength(spec: str) -> float:
    """``gated@0.5`` -> 0.5, ``exclusive@2`` -> 2 (default 1)."""
    base = spec.partition("+")[0]
    return float(base.split("@")[1]) if "@" in base else 1.0


def _owner(inp: Inputs, name: str, key: str, layer: int) -> torch.Tensor:
    s = inp.owner.get(name)
    if s is None:
        raise FlexmoeError(
            f"Expert {name!r} shipped no routing statistics.",
            "the owner runs: flexmoe expert stats PACKAGE --anchor A --data DIR --public DIR.",
        )
    return s[f"layers.{layer}.{key}"].double()


def _anchor(inp: Inputs, key: str, layer: int) -> torch.Tensor:
    if inp.anchor is None:
        raise FlexmoeError(
            "The anchor has no published routing statistics.",
            "the maintainer runs: flexmoe anchor routing-stats ANCHOR --public DIR.",
        )
    return inp.anchor[f"layers.{layer}.{key}"].double()


def phatgoose(inp: Inputs, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = inp.rows[layer].double()
    H = rows.shape[1]
    std_rows = (rows - rows.mean(1, keepdim=True)) / rows.std(1, keepdim=True).clamp_min(1e-12)
    mu, cov = _anchor(inp, "mean", layer), _anchor(inp, "cov", layer)
    centre = torch.eye(H, dtype=torch.float64) - 1.0 / H
    # Typical per-token standard deviation across dimensions on public text (E over tokens of the
    # centred squared norm, from the published mean and covariance).
    sigma = math.sqrt(float((centre @ cov @ centre).trace() + (centre @ mu).square().sum()) / H)
    return std_rows / (sigma * math.sqrt(H)), torch.zeros(len(rows), dtype=torch.float64)


def calibrated(inp: Inputs, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, bias = inp.rows[layer].double().clone(), inp.biases[layer].double().clone()
    owners = inp.names[1:]
    own = torch.stack([_owner(inp, n, "margin_own", layer)[0] for n in owners])
    pub = torch.stack([_owner(inp, n, "margin_public", layer)[0] for n in owners])
    gap = own - pub
    target_own, target_pub = own.mean(), pub.mean()
    for j in range(len(owners)):
        # A row that hardly separates its own text from public (or ranks public higher: measured for
        # code in BENCHMARKS.md) would need an absurd scale; MAX_SCALE bounds it either way.
        a = ((target_own - target_pub) / gap[j].clamp_min(1e-6)).clamp(1 / MAX_SCALE, MAX_SCALE)
        c = target_pub - a * pub[j]
        rows[j + 1] = rows[0] + a * (rows[j + 1] - rows[0])
        bias[j + 1] = a * bias[j + 1] + c
    bias[0] = 0.0
    return rows, bias


def lda(inp: Inputs, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    cov = regularised(_anchor(inp, "cov", layer))
    means = torch.stack(
        [_anchor(inp, "mean", layer)] + [_owner(inp, n, "mean_own", layer) for n in inp.names[1:]]
    )
    w = torch.linalg.solve(cov, means.T).T  # [E, H] = S^-1 mu_i
    return w, -0.5 * (w * means).sum(1)


def gated(inp: Inputs, layer: int, lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Trained rows plus ``lam`` times each owner's LDA margin over public, centred on the owner's own
    mean: on the owner's own text the shift is zero on average, so public and the owner keep the
    weights they were trained with (which the owner's FFN was trained to be mixed at); elsewhere the
    margin is negative and the owner's claim shrinks."""
    rows, bias = inp.rows[layer].double().clone(), inp.biases[layer].double().clone()
    w, c = lda(inp, layer)
    for j, n in enumerate(inp.names[1:], start=1):
        dw, dc = w[j] - w[0], c[j] - c[0]
        centre = float(dw @ _owner(inp, n, "mean_own", layer)) + float(dc)
        rows[j] = rows[j] + lam * dw
        bias[j] = bias[j] + lam * (dc - centre)
    return rows, bias


def exclusive(inp: Inputs, layer: int, k: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Trained rows, each owner's lowered where it would claim another owner's text: on owner e's mean
    router input, owner d's margin over e is pushed down to ``-k`` standard deviations (of that margin
    on public text) when it is higher. The change of d's row is the smallest in public variance that
    also keeps d's logit on its own mean and on the public mean: what d learned to claim stays, and only
    the direction by which e's text differs from d's and from public text is touched."""
    rows, bias = inp.rows[layer].double().clone(), inp.biases[layer].double()
    cov = regularised(_anchor(inp, "cov", layer))
    owners = inp.names[1:]
    means = torch.stack([_anchor(inp, "mean", layer)] + [_owner(inp, n, "mean_own", layer) for n in owners])
    base = inp.rows[layer].double()
    # delta = S^-1 M (M' S^-1 M)^-1 target: least delta' S delta with M' delta = target (M: the means).
    sm = torch.linalg.solve(cov, means.T)
    gram = means @ sm
    gram = gram + 1e-9 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    for d in range(1, len(inp.names)):
        target = torch.zeros(len(means), dtype=torch.float64)  # change of d's logit at each mean
        for e in range(1, len(inp.names)):
            if e == d:
                continue
            diff = base[d] - base[e]
            margin = float(diff @ means[e])  # the rows alone: what the stock export routes by
            spread = float((diff @ cov @ diff).clamp_min(0).sqrt())
            target[e] = -max(0.0, margin + k * spread)
        if bool(target.ne(0).any()):
            rows[d] = rows[d] + sm @ torch.linalg.solve(gram, target)
    return rows, bias


def trained(inp: Inputs, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    return inp.rows[layer].double(), inp.biases[layer].double()


RULES = {
    "trained": trained,
    "phatgoose": phatgoose,
    "calibrated": calibrated,
    "lda": lda,
    "gated": gated,
    "exclusive": exclusive,
}


def plan(spec: str, inp: Inputs, bias_mode: str | None = None) -> tuple[list, list, dict]:
    """Rows ``[E, H]`` and biases ``[E]`` per layer for ``spec`` and the record for ``flexmoe.json``."""
    method, prior = parse(spec)
    bias_mode = bias_mode or ("keep" if method == "trained" else "fold")
    if bias_mode not in BIAS_MODES:
        raise FlexmoeError(f"Unknown --routing-bias {bias_mode!r}.", f"use one of {', '.join(BIAS_MODES)}.")
    rows_out, bias_out, spread = [], [], []
    for layer in range(len(inp.rows)):
        if method in ("gated", "exclusive"):
            rows, bias = RULES[method](inp, layer, strength(spec))
        else:
            rows, bias = RULES[method](inp, layer)
        if prior:
            bias = bias.clone()
            bias[0] += math.log(max(1, len(inp.names) - 1))
        bias = bias - bias.max()
        if bias_mode == "fold" and bool(bias.ne(0).any()):
            u = _anchor(inp, "const", layer)
            rows = rows + bias[:, None] * u[None, :]
            spread.append(float(_anchor(inp, "const_cv", layer)))
            bias = torch.zeros_like(bias)
        rows_out.append(rows)
        bias_out.append(bias)
    record = {
        "method": spec,
        "bias": bias_mode,
        "experts": list(inp.names),
        "fold_spread": spread or None,  # std of u.h / its mean on public text: the folding error scale
    }
    return rows_out, bias_out, record


# --------------------------------------------------------------------------------------------------
# Compose-side plumbing: gather the inputs, write the routed model, keep what recomputation needs.


def inputs_for(experts: list, owner_stats: dict, anchor_stats: dict | None, layers: int) -> Inputs:
    rows = [torch.stack([e.row(i).double() for e in experts]) for i in range(layers)]
    biases = [torch.tensor([e.bias(i) for e in experts], dtype=torch.float64) for i in range(layers)]
    names = [e.name for e in experts]
    return Inputs(
        names, rows, biases, {n: owner_stats[n] for n in names[1:] if n in owner_stats}, anchor_stats
    )


def package_stats(packages: Sequence[Path], names: Sequence[str]) -> dict[str, dict]:
    out = {}
    for p, n in zip(packages, names, strict=True):
        s = load_owner_stats(p)
        if s is not None:
            out[n] = s
    return out


def saved(model: Path) -> tuple[dict[str, dict], dict | None, dict[str, tuple]]:
    """What a routed model keeps for recomputation: owner statistics by name, anchor statistics, and
    each expert's trained (row getter, bias getter) by name."""
    f = Path(model) / ROUTING_FILE
    if not f.is_file():
        return {}, None, {}
    t = load_file(str(f))
    owner: dict[str, dict] = {}
    anchor: dict[str, torch.Tensor] = {}
    trained_rows: dict[str, tuple] = {}
    for k, v in t.items():
        kind, rest = k.split("/", 1)
        if kind == "anchor":
            anchor[rest] = v
        elif kind == "owner":
            name, key = rest.split("/", 1)
            owner.setdefault(name, {})[key] = v
    for name in {k.split("/")[1] for k in t if k.startswith("trained/")}:
        trained_rows[name] = (
            lambda i, n=name: t[f"trained/{n}/layers.{i}.row"],
            lambda i, n=name: float(t[f"trained/{n}/layers.{i}.bias"]),
        )
    return owner, anchor or None, trained_rows


def restore_trained(model: Path, experts: list) -> tuple[list, dict, dict | None]:
    """Experts of a composed model with their trained rows and biases back, plus the statistics."""
    owner, anchor, trained_rows = saved(model)
    out = [
        replace(e, row=trained_rows[e.name][0], bias=trained_rows[e.name][1]) if e.name in trained_rows else e
        for e in experts
    ]
    return out, owner, anchor


def write_routed(tmp: Path, write_model, job, routing: Request) -> dict:
    """Write the composed model of ``job`` (``flexmoe.compose.WriteJob``: this module sits below compose
    and takes compose's writer and job as they are) with ``routing`` applied."""
    L = job.config["num_hidden_layers"]
    dtype = job.shared.get("model.embed_tokens.weight").dtype
    # Rows pass through the model's dtype first, so a recomputation from the stored rows is identical.
    trained_rows = [[e.row(i).to(dtype) for i in range(L)] for e in job.experts]
    base = [replace(e, row=lambda i, r=trained_rows[j]: r[i]) for j, e in enumerate(job.experts)]
    method, _ = parse(routing.method)
    need_owner, need_anchor = needs(method)
    inp = inputs_for(base, routing.owner if need_owner else {}, routing.anchor, L)
    rows, biases, record = plan(routing.method, inp, routing.bias)
    routed = [
        replace(
            e,
            row=lambda i, j=j: rows[i][j].to(dtype),
            bias=lambda i, j=j: float(biases[i][j]),
        )
        for j, e in enumerate(base)
    ]
    out = write_model(tmp, replace(job, experts=routed, meta={**job.meta, "routing": record}))
    keep = {}
    for j, e in enumerate(base):
        # Kept only where the model's row or bias is not the trained one: otherwise the model holds
        # it already (and router training, which changes only rows, changes no other file).
        if all(
            torch.equal(rows[i][j].to(dtype), trained_rows[j][i]) and float(biases[i][j]) == e.bias(i)
            for i in range(L)
        ):
            continue
        for i in range(L):
            keep[f"trained/{e.name}/layers.{i}.row"] = trained_rows[j][i].contiguous()
            keep[f"trained/{e.name}/layers.{i}.bias"] = torch.tensor(e.bias(i), dtype=torch.float32)
    for n, s in routing.owner.items():
        if n in inp.names:
            keep.update({f"owner/{n}/{k}": v.contiguous() for k, v in s.items()})
    if routing.anchor is not None:
        keep.update({f"anchor/{k}": v.contiguous() for k, v in routing.anchor.items()})
    save_file(keep, str(Path(tmp) / ROUTING_FILE), metadata={"format": "pt"})
    return out


@dataclass
class Request:
    """A routing method with what it may read: owner statistics by name and the anchor's statistics."""

    method: str = DEFAULT
    bias: str | None = None
    owner: dict[str, dict] = field(default_factory=dict)
    anchor: dict[str, torch.Tensor] | None = None
