"""The FlexOlmo FFN block: the anchor's dense FFN as expert 0 plus owner experts, one router row and
one non-positive bias per expert, and masks for inference-time inclusion/exclusion.

Masks and routing outputs are per call, never state on the block: a ``Routing`` object, made active with
``with routing(Routing(mask=...)):`` around a model call, carries the mask (one per expert, per sequence
``[B, E]`` or per token ``[B, S, E]``) in and the routing weights out. The decoder layers of the stock HF
classes call ``layer.mlp(x)`` with nothing else, so the context travels beside the call (a module-level
slot that ``routing()`` holds under a lock, see ``_Active``), and the stock ``flex_olmo`` export stays
untouched.

Routing semantics equal Hugging Face ``flex_olmo`` when every bias is zero: softmax over all experts in
fp32, top-k, weights not renormalised. The block replaces ``layer.mlp`` of an OLMo 2 or Llama-family
decoder layer, so it sees exactly what the dense FFN saw (OLMo 2: the raw residual stream; Llama: the
post-attention-normed stream).

Trainable pieces are plain modules that see ``[batch, seq, hidden]`` inputs: owner experts are copies
of the anchor FFN (``nn.Linear`` SwiGLU) and each router row is a ``RouterRow``. That keeps per-sample
gradients (differential privacy) per sequence, never per token.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from flexmoe.parallel import decoder_layers, full


def nonpositive(raw: torch.Tensor) -> torch.Tensor:
    """``min(raw, 0)`` in value, identity in gradient (straight-through).

    Ai2's ``min(b, 0)`` has zero gradient once ``b > 0``, so a bias that crosses zero is dead forever.
    Here the gradient always flows; ``RouterRow.project_`` keeps ``raw`` itself <= 0 after each step.
    """
    return raw - (raw - raw.clamp(max=0.0)).detach()


class RouterRow(nn.Module):
    """One expert's router row ``w`` (``[1, hidden]``) and its bias ``b <= 0``: logit = ``w.x + b``."""

    def __init__(self, row: torch.Tensor, bias: float = 0.0, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = nn.Parameter(row.detach().to(dtype, copy=True).view(1, -1))
        self.bias_raw = nn.Parameter(torch.tensor([min(float(bias), 0.0)], dtype=dtype, device=row.device))

    @property
    def bias(self) -> torch.Tensor:
        return nonpositive(self.bias_raw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight) + self.bias

    @torch.no_grad()
    def project_(self) -> None:
        """Project the raw bias back onto ``b <= 0`` (called after every optimiser step)."""
        self.bias_raw.clamp_(max=0.0)


def routing_weights(logits: torch.Tensor, top_k: int, normalize_topk: bool = False) -> torch.Tensor:
    """Dense ``[..., E]`` weights: softmax over all experts, zero outside the top-k, not renormalised
    (FlexOlmo; ``normalize_topk`` for upcycled MoEs). At least fp32; float64 logits stay float64."""
    probs = logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    if top_k >= probs.shape[-1]:
        return probs
    top_v, top_i = probs.topk(top_k, dim=-1)
    if normalize_topk:
        top_v = top_v / top_v.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, top_i, top_v)


@dataclass
class Routing:
    """What one model call routes with and what it routed.

    ``mask``: bool, ``[E]`` for the whole batch, ``[B, E]`` per sequence or ``[B, S, E]`` per token;
    False excludes an expert (its logit becomes -inf, which equals physically removing it).
    With ``record``, ``weights`` is the sum over MoE layers of the routing weights, ``[B, S, E]``
    (stays on the model's device: reading it is the caller's synchronisation, not the forward's).
    """

    mask: torch.Tensor | None = None
    record: bool = False
    weights: torch.Tensor | None = field(default=None, repr=False)

    def add(self, weights: torch.Tensor) -> None:
        w = weights.detach().float()
        self.weights = w if self.weights is None else self.weights + w


class _Active:
    """The routing of the model call in progress. A plain attribute rather than a ``ContextVar`` or a
    thread-local: ``torch.compile`` traces an attribute read (a guard on None or not, the mask as a
    graph input) but breaks the graph at ``ContextVar.get``. ``routing()`` holds a re-entrant lock
    while it is active, so threads that route model calls take turns and never see each other's."""

    current: Routing | None = None
    lock = threading.RLock()


_ACTIVE = _Active()


@contextlib.contextmanager
def routing(r: Routing | None = None) -> Iterator[Routing]:
    """Make ``r`` (a fresh ``Routing(record=True)`` by default) the routing of model calls inside."""
    r = Routing(record=True) if r is None else r
    with _ACTIVE.lock:
        previous, _ACTIVE.current = _ACTIVE.current, r
        try:
            yield r
        finally:
            _ACTIVE.current = previous


def active_routing() -> Routing | None:
    """The ``Routing`` of the model call in progress, if one was made active."""
    return _ACTIVE.current


def _mask_for(mask: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Broadcast a ``[E]``, ``[B, E]`` or ``[B, S, E]`` mask against ``[B, S, E]`` (or ``[T, E]``) logits."""
    mask = mask.to(device=logits.device, dtype=torch.bool)
    if mask.dim() == 2 and logits.dim() == 3:
        mask = mask[:, None, :]
    return mask


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    """``torch._grouped_mm`` takes bf16 everywhere; fp32 only on the CPU and outside torch.compile."""
    return x.dtype == torch.bfloat16 or (x.device.type == "cpu" and not torch.compiler.is_compiling())


class FlexMoEBlock(nn.Module):
    """Mixture of full-size FFN experts with FlexOlmo routing.

    ``experts[0]`` is the anchor's FFN. The active ``Routing`` (if any) supplies the mask and collects
    the routing weights. On an accelerator the forward never synchronises with the host: masked experts
    get zero weight instead of being skipped, and top-k < E dispatches through one grouped matmul
    (``fuse_experts_``, inference) or, for blocks that were not fused, runs every expert densely. On the
    CPU, where a sync is free and FLOPs are not, an unfused block (training; upcycled models kept in
    memory) runs each expert on its own tokens only.
    """

    def __init__(
        self, experts: list[nn.Module], rows: list[RouterRow], top_k: int, normalize_topk: bool = False
    ):
        super().__init__()
        if len(experts) != len(rows):
            raise ValueError("one router row per expert")
        self.experts = nn.ModuleList(experts)
        self.router = nn.ModuleList(rows)
        self.top_k = top_k
        # FlexOlmo never renormalises (a lone owner expert must not get weight 1 by default); upcycled,
        # jointly trained MoEs (BTX, unrestricted) do, so that they start exactly at their dense parents.
        self.normalize_topk = normalize_topk
        # Training-only auxiliary losses of the last training forward, read by the training loop.
        self.z_loss: torch.Tensor | None = None
        self.z_tokens: torch.Tensor | None = None  # z-loss per token (x.shape[:-1]), same forwards
        self.balance_loss: torch.Tensor | None = None
        # Views of the experts' weights stacked [E, out, in] (inference only, see fuse_experts_).
        self.fused: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # The router rows stacked [E, hidden] the same way: one matmul instead of one per expert (at
        # batch-1 decode, 8 separate row matmuls per layer cost more than the grouped expert matmuls;
        # a gather of the chosen experts' weights was slower still: benchmarks/decode_profile.py).
        self.fused_router: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def router_logits(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Router logits ``[..., E]`` in the rows' dtype (fp32, or fp64 in a float64 model) including
        biases and the mask (if given)."""
        if self.fused_router is not None and not self.training:
            bias = torch.cat([row.bias_raw for row in self.router]).clamp(max=0.0)
            logits = F.linear(x.to(self.fused_router.dtype), self.fused_router) + bias
        else:
            logits = torch.cat([row(x) for row in self.router], dim=-1)
        if mask is not None:
            logits = logits.masked_fill(~_mask_for(mask, logits), float("-inf"))
        return logits

    def routing_weights(self, logits: torch.Tensor) -> torch.Tensor:
        return routing_weights(logits, self.top_k, self.normalize_topk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = _ACTIVE.current
        logits = self.router_logits(x, r.mask if r is not None else None)
        # Only training adds the z-loss; clearing it in eval keeps a stale value out of eval losses.
        # Per-token values stay available for per-sample losses (DP ghost clipping needs one per sequence).
        self.z_tokens = torch.logsumexp(logits, dim=-1).square() if self.training else None
        self.z_loss = self.z_tokens.mean() if self.z_tokens is not None else None
        weights = self.routing_weights(logits)
        self.balance_loss = self._balance(logits, weights) if self.training else None
        if r is not None and r.record:
            r.add(weights)
        if self.top_k >= self.num_experts:
            return self._dense(x, weights)
        if self.fused is not None and _grouped_mm_ok(x):
            return self._grouped(x, weights)
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            return self._sparse(x, weights)
        return self._dense(x, weights)

    def _balance(self, logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Switch-style load-balancing loss E * sum_e f_e * P_e (only jointly trained MoEs use it;
        FlexOlmo's anchored training does not: an owner's expert should claim only its own inputs)."""
        probs = logits.softmax(-1, dtype=torch.float32).reshape(-1, self.num_experts)
        chosen = (weights.reshape(-1, self.num_experts) > 0).float()
        return self.num_experts * (chosen.mean(0) / self.top_k * probs.mean(0)).sum()

    def _dense(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every token through every expert, weighted (a masked or unrouted expert has weight 0, which
        adds exact zeros): no dispatch, best when k equals E (FlexOlmo expert training is top-2 of 2)."""
        out = None
        for e, expert in enumerate(self.experts):
            y = weights[..., e : e + 1].to(x.dtype) * expert(x)
            out = y if out is None else out + y
        return out

    def _sparse(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each expert on the tokens that chose it (trainable, unlike the fused views). It asks the host
        which tokens those are, a sync that costs nothing on the CPU, where the FLOPs of top-k < E run
        densely would: the demo's unrestricted MoE (top-2 of 4) trains in 0.71x the time
        (``benchmarks/moe_dispatch.py``)."""
        flat_x, flat_w = x.reshape(-1, x.shape[-1]), weights.reshape(-1, self.num_experts)
        out = torch.zeros_like(flat_x)
        for e, expert in enumerate(self.experts):
            rows = flat_w[:, e].nonzero().squeeze(1)  # a masked or unchosen expert's weight is exactly 0
            if rows.numel():
                out.index_add_(0, rows, flat_w[rows, e, None].to(x.dtype) * expert(flat_x[rows]))
        return out.view_as(x)

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each token through its top-k experts only, in one grouped matmul per projection: the
        (token, expert) pairs are sorted by expert and the group sizes stay on the device (no sync)."""
        gate_w, up_w, down_w = self.fused
        flat_x = x.reshape(-1, x.shape[-1])
        top_w, top_i = weights.reshape(-1, self.num_experts).topk(self.top_k, dim=-1)
        flat_e = top_i.reshape(-1)
        order = flat_e.argsort(stable=True)
        tokens = order // self.top_k
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat_e.to(torch.int64), torch.ones_like(flat_e, dtype=torch.int32))
        offs = counts.cumsum(0, dtype=torch.int32)
        xs = flat_x[tokens]
        act = self.experts[0].act_fn
        h = act(torch._grouped_mm(xs, gate_w.transpose(1, 2), offs=offs))
        h = h * torch._grouped_mm(xs, up_w.transpose(1, 2), offs=offs)
        y = torch._grouped_mm(h, down_w.transpose(1, 2), offs=offs)
        y = y * top_w.reshape(-1)[order, None].to(y.dtype)
        out = torch.zeros_like(flat_x)
        out.index_put_((tokens,), y, accumulate=True)
        return out.view_as(x)

    @torch.no_grad()
    def fuse_experts_(self) -> None:
        """Store the SwiGLU experts' weights stacked ``[E, out, in]`` and make each expert's weights
        views of them (no extra memory), so that top-k < E runs as grouped matmuls (inference)."""
        stacks = []
        for proj in ("gate_proj", "up_proj", "down_proj"):
            lins = [getattr(e, proj) for e in self.experts]
            if any(lin.bias is not None for lin in lins):
                return  # grouped path covers bias-free SwiGLU (OLMo 2, Llama) only
            stacked = torch.stack([lin.weight for lin in lins])
            for e, lin in enumerate(lins):
                lin.weight = nn.Parameter(stacked[e], requires_grad=lin.weight.requires_grad)
            stacks.append(stacked)
        self.fused = tuple(stacks)
        rows = torch.cat([row.weight for row in self.router])
        for e, row in enumerate(self.router):
            row.weight = nn.Parameter(rows[e : e + 1], requires_grad=row.weight.requires_grad)
        self.fused_router = rows


# --------------------------------------------------------------------------------------------------
# Putting blocks into an HF dense decoder


def moe_blocks(model: nn.Module) -> list[FlexMoEBlock]:
    return [m for m in model.modules() if isinstance(m, FlexMoEBlock)]


def anchored_expert_model(
    anchor: nn.Module, public_rows: torch.Tensor, owner_rows: torch.Tensor, bias_init: float = 0.0
) -> nn.Module:
    """Turn a dense anchor (in place) into the 2-expert training model of one data owner.

    Expert 0 = the anchor FFN (frozen), expert 1 = a trainable copy; router rows ``[layers, hidden]``
    for the public row (frozen) and the owner's row (trainable); routing is top-2 of 2. Everything the
    anchor had stays frozen. Trainable weights and router rows are fp32, or fp64 in a float64 anchor.
    """
    for p in anchor.parameters():
        p.requires_grad_(False)
    for i, layer in enumerate(decoder_layers(anchor)):
        # trainable master weights: at least fp32 (a bf16 anchor's copy is fp32; a float64 one stays)
        master = torch.promote_types(next(layer.mlp.parameters()).dtype, torch.float32)
        owner = copy.deepcopy(layer.mlp).to(master)
        for p in owner.parameters():
            p.requires_grad_(True)
        pub_row = RouterRow(public_rows[i], dtype=master)
        pub_row.requires_grad_(False)
        own_row = RouterRow(owner_rows[i], bias_init, dtype=master)
        layer.mlp = FlexMoEBlock([layer.mlp, owner], [pub_row, own_row], top_k=2)
    return anchor


def router_z_loss(model: nn.Module) -> torch.Tensor:
    """Mean router z-loss over the MoE blocks of the last forward pass (0 if none recorded)."""
    zs = [b.z_loss for b in moe_blocks(model) if b.z_loss is not None]
    return torch.stack(zs).mean() if zs else torch.zeros(())


def balance_loss(model: nn.Module) -> torch.Tensor:
    """Mean load-balancing loss over the MoE blocks of the last training forward pass."""
    ls = [b.balance_loss for b in moe_blocks(model) if b.balance_loss is not None]
    return torch.stack(ls).mean() if ls else torch.zeros(())


def project_biases_(model: nn.Module) -> None:
    for b in moe_blocks(model):
        for row in b.router:
            row.project_()


def anchor_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The anchor's own tensors inside an expert model, under the anchor's original names.

    Expert 0 of each block is the anchor FFN (``mlp.experts.0.x`` -> ``mlp.x``); owner experts and
    router rows are not anchor tensors.
    """
    out = {}
    for name, t in model.state_dict().items():
        t = full(t)  # whole tensors under FSDP (a collective: every rank calls this)
        if ".mlp.experts.0." in name:
            out[name.replace(".mlp.experts.0.", ".mlp.")] = t
        elif ".mlp.experts." not in name and ".mlp.router." not in name:
            out[name] = t
    return out
