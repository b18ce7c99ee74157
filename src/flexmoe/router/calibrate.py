"""Data-free router recalibration when the set of experts changes: public text only, no proxy sets,
no owner data, deterministic.

The problem: every owner trained a 2-expert model {anchor, own expert} and learned "mine vs public"
against the anchor's frozen public row. On public text the owner's expert took some share ``s_i`` of
the routing weight and the anchor the rest. Composed, the experts' claims on public text add up: with
three owners the anchor keeps far less of public text than any owner trained with, and public text
is what the anchor's FFN models best (in the tiny demo every 2-expert model has a higher public
perplexity than the anchor alone). Adding experts makes this worse; removing one changes it again.

The fix: move the public (anchor) router row of each layer along ``u_l``, the unit direction of the
mean router input over public calibration text, by ``alpha_l``, so that on that text the anchor's share
of the routing weight in the composed model (with its top-k, not renormalised) equals the anchor's share
the owners trained with, ``mean_i(1 - s_i)``. Each ``s_i`` is measured on the same public text in the
2-expert model rebuilt from the composed checkpoint itself (the anchor FFN, expert ``i`` and their rows,
every other expert masked), so nothing is needed from the owners. Router inputs share a large common
component, so ``u_l . x`` is positive on almost every token and largest on public-looking ones: adding
``alpha u_l`` acts like a bias towards (or away from) the anchor that is strongest exactly where the
experts steal public tokens, and the anchor's share rises monotonically with ``alpha``. (The first
version scaled the row by ``a_l`` instead; that is monotone only while the row's logit is positive on
public text, which stopped holding once rows were trained against public negatives, and the bisection
then moved the share the wrong way.) Only one number per layer is fitted, so a few thousand public tokens
pin it down; and it lives in the router weights, so stock transformers computes the calibrated model
exactly (the HF format has no slot for a bias).

The layers are solved in order (a layer's input depends on the layers below it) by bisection on
``alpha_l`` with a fixed number of steps in float64 over a fixed sample of public blocks: the same
inputs give the same bytes. The row before calibration is kept in ``flexmoe_calibration.safetensors``,
so the calibration of a model is always recomputed from its trained rows: ``add``/``remove``/``update``
with ``--calibrate`` give exactly what ``compose --calibrate`` gives for the new set of experts, and
without ``--calibrate`` they return to the trained rows (a calibration is only valid for the set of
experts it was solved for).

Tried and rejected (numbers in BENCHMARKS.md): scaling each owner's margin over the anchor so that
each expert's share on public text matches its 2-expert share made every domain worse; a bias cannot be
folded into HF weights (no direction of the residual stream is constant enough).
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from flexmoe.compose import CALIBRATION_FILE, Calibrator, WriteJob, training_seq_len
from flexmoe.data import blocks_for, load_splits
from flexmoe.errors import FlexmoeError
from flexmoe.moe import moe_blocks, routing_weights
from flexmoe.router_init import RouterInputs, sample_docs
from flexmoe.runtime import from_pretrained
from flexmoe.signing import ALLOW_UNSIGNED

METHOD = "public-row shift: anchor share on public text matched to the owners' 2-expert training"
BLOCKS = 8  # 2,048 tokens at the demo's length: one number per layer is pinned down well
BISECT_STEPS = 40
SHIFT_RANGE = 20.0  # |alpha_l * mean(u_l . x)| within 20 logits: far past any share in (0, 1)


def calibration_blocks(public: Sequence[Path], tokenizer, seq_len: int, n: int = BLOCKS) -> torch.Tensor:
    """A fixed sample of public training blocks: documents spread evenly over the corpus."""
    if not public:
        raise FlexmoeError("--calibrate needs public data.", "pass --public PATH (the public corpus).")
    docs = load_splits(public).train
    blocks = blocks_for(sample_docs(docs, max(4 * n, 64)), tokenizer, seq_len)
    idx = torch.linspace(0, len(blocks) - 1, min(n, len(blocks))).round().long()
    return blocks[idx]


class _Stop(Exception):
    """Raised by a hook once the wanted layer's input is captured: the layers above are not needed."""


@torch.no_grad()
def router_inputs(model, blocks, x: torch.Tensor, layer: int, batch: int = 8) -> torch.Tensor:
    """``[tokens, hidden]`` router inputs of one layer (float64) for the blocks ``x``."""
    seen: list[torch.Tensor] = []

    def hook(module, args):
        seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
        raise _Stop

    handle = blocks[layer].register_forward_pre_hook(hook)
    device = next(model.parameters()).device
    try:
        for s in range(0, len(x), batch):
            try:
                model(input_ids=x[s : s + batch].to(device))
            except _Stop:
                pass
        return torch.cat(seen)
    finally:
        handle.remove()


def anchor_share(logits: torch.Tensor, top_k: int) -> float:
    """The anchor's (expert 0's) fraction of the routing weight that was handed out."""
    w = routing_weights(logits, top_k)
    return float(w[:, 0].sum() / w.sum())


def solve_shift(base: torch.Tensor, along: torch.Tensor, target: float, top_k: int) -> float:
    """``alpha`` with anchor_share(logits with ``alpha * along`` added to column 0) == target, by
    bisection; ``along`` (``[tokens]``) is positive on almost every token, so the share rises with
    ``alpha``. If the target is out of reach the nearer end is returned."""

    def share(alpha: float) -> float:
        lg = base.clone()
        lg[:, 0] += alpha * along
        return anchor_share(lg, top_k)

    reach = SHIFT_RANGE / max(float(along.abs().mean()), 1e-12)
    lo, hi = -reach, reach
    if share(lo) >= target:
        return lo
    if share(hi) <= target:
        return hi
    for _ in range(BISECT_STEPS):
        mid = (lo + hi) / 2
        if share(mid) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@torch.no_grad()
def solve(
    model_dir: Path, public: Sequence[Path], *, n_blocks: int = BLOCKS
) -> tuple[list[torch.Tensor], dict]:
    """Per-layer public-row shifts (``[hidden]`` float64) for an (uncalibrated) composed model, and the
    record to keep."""
    torch.manual_seed(0)
    # The scratch model compose has just written to calibrate on (never signed: it is no output).
    c = from_pretrained(model_dir, use_bias=False, trust=ALLOW_UNSIGNED)
    x = calibration_blocks(public, c.tokenizer, training_seq_len(c.meta), n_blocks).to(c.device)
    blocks = moe_blocks(c.model)
    names, top_k = c.names, blocks[0].top_k
    rows = [torch.cat([r.weight.double() for r in b.router]) for b in blocks]  # [E, H] per layer
    # 2-expert shares: expert i's weight on public text with only {anchor, i} routable and every token
    # through both (top-2 of 2, as the owner trained); the runtime's masks give exactly that model.
    owner_share: dict[str, list[float]] = {}
    for e, name in enumerate(names[1:], start=1):
        c.set_experts(include=[name])
        for b in blocks:
            b.top_k = len(names)
        sums = [0.0] * len(blocks)
        cap = RouterInputs(blocks)
        try:
            for s in range(0, len(x), 8):
                c.model(input_ids=x[s : s + 8])
                for layer in range(len(blocks)):
                    h = cap.seen[layer].reshape(-1, cap.seen[layer].shape[-1]).double()
                    sums[layer] += float((h @ rows[layer][[0, e]].T).softmax(-1)[:, 1].sum())
        finally:
            cap.close()
        owner_share[name] = [v / (x.shape[0] * x.shape[1]) for v in sums]
    for b in blocks:
        b.top_k = top_k
    c.set_experts()
    shifts, alphas, before, after, targets = [], [], [], [], []
    for layer, block in enumerate(blocks):
        h = router_inputs(c.model, blocks, x, layer)  # depends on the layers already calibrated
        base = h @ rows[layer].T
        u = h.mean(0)
        u = u / u.norm().clamp_min(1e-12)
        target = sum(1 - owner_share[n][layer] for n in names[1:]) / max(1, len(names) - 1)
        alpha = solve_shift(base, h @ u, target, top_k)
        lg = base.clone()
        lg[:, 0] += alpha * (h @ u)
        before.append(anchor_share(base, top_k))
        after.append(anchor_share(lg, top_k))
        targets.append(target)
        alphas.append(alpha)
        shifts.append((alpha * u).cpu())  # the written rows are built on the CPU
        block.router[0].weight.add_((alpha * u).to(block.router[0].weight.dtype))
    record = {
        "method": METHOD,
        "experts": names,
        "public_row_shift": alphas,  # alpha_l along the unit mean public router input
        "anchor_share_on_public": {"before": before, "after": after, "target": targets},
        "owner_share_on_public_2expert": owner_share,
        "data": {"blocks": len(x), "seq_len": x.shape[1]},
        "top_k": top_k,
    }
    return shifts, record


def write_calibrated(
    tmp: Path, write_model: Callable[[Path, WriteJob], dict], job: WriteJob, public: Sequence[Path]
) -> dict:
    """Write ``job`` calibrated into ``tmp`` with compose's own writer (the ``Calibrator`` call).

    The uncalibrated model is written to a scratch directory first (the calibration runs the model),
    then the final one with the public row shifted. Both rows pass through the model's dtype first, so
    the result does not depend on whether the trained row came from a package or from a checkpoint.
    """
    scratch = Path(tempfile.mkdtemp(prefix=".calibrate-", dir=Path(tmp).parent))
    try:
        write_model(scratch, job)
        shifts, record = solve(scratch, public)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    dtype = job.shared.get("model.embed_tokens.weight").dtype
    pub = job.experts[0]
    trained = [pub.row(i).to(dtype) for i in range(len(shifts))]
    calibrated = replace(pub, row=lambda i: (trained[i].double() + shifts[i].view_as(trained[i])).to(dtype))
    experts, meta = [calibrated, *job.experts[1:]], {**job.meta, "router_calibration": record}
    out = write_model(tmp, replace(job, experts=experts, meta=meta))
    save_file(
        {f"model.layers.{i}.mlp.gate.trained_public_row": r.contiguous() for i, r in enumerate(trained)},
        str(Path(tmp) / CALIBRATION_FILE),
        metadata={"format": "pt"},
    )
    return out


def calibrator(public: Sequence[Path]) -> Calibrator:
    """What ``compose``, ``add``, ``update`` and ``remove`` take as ``calibrate=``: recalibrate the
    router on ``public`` (documents) for the experts being written."""
    return functools.partial(write_calibrated, public=list(public))
