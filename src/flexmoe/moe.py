"""The FlexOlmo FFN block: the anchor's dense FFN as expert 0 plus owner experts, one router row and
one non-positive bias per expert, and masks for inference-time inclusion/exclusion.

Routing semantics equal Hugging Face ``flex_olmo`` when every bias is zero: softmax over all experts in
fp32, top-k, weights not renormalised. The block replaces ``layer.mlp`` of an OLMo 2 or Llama-family
decoder layer, so it sees exactly what the dense FFN saw (OLMo 2: the raw residual stream; Llama: the
post-attention-normed stream).

Trainable pieces are plain modules that see ``[batch, seq, hidden]`` inputs: owner experts are copies
of the anchor FFN (``nn.Linear`` SwiGLU) and each router row is a ``RouterRow``. That keeps per-sample
gradients (differential privacy) per sequence, never per token.
"""

from __future__ import annotations

import copy

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

    def __init__(self, row: torch.Tensor, bias: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(row.detach().clone().float().view(1, -1))
        self.bias_raw = nn.Parameter(torch.tensor([min(float(bias), 0.0)], device=row.device))

    @property
    def bias(self) -> torch.Tensor:
        return nonpositive(self.bias_raw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight) + self.bias

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


class FlexMoEBlock(nn.Module):
    """Mixture of full-size FFN experts with FlexOlmo routing.

    ``experts[0]`` is the anchor's FFN. ``mask`` (bool, one per expert) excludes experts at inference:
    their logits become -inf before the softmax, which equals physically removing them.
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
        # On the rows' device: a CPU buffer in a GPU model breaks DDP's parameter/buffer broadcast.
        device = rows[0].weight.device if rows else None
        self.register_buffer(
            "mask", torch.ones(len(experts), dtype=torch.bool, device=device), persistent=False
        )
        self.z_loss: torch.Tensor | None = None  # set on each forward in training mode
        self.z_tokens: torch.Tensor | None = None  # z-loss per token (x.shape[:-1]), same forwards
        self.balance_loss: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None  # routing weights of the last forward, if recording
        self.record = False

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 router logits ``[..., E]`` including biases and masks."""
        logits = torch.cat([row(x) for row in self.router], dim=-1)
        if not bool(self.mask.all()):
            logits = logits.masked_fill(~self.mask, float("-inf"))
        return logits

    def routing_weights(self, logits: torch.Tensor) -> torch.Tensor:
        return routing_weights(logits, self.top_k, self.normalize_topk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router_logits(x)
        # Only training adds the z-loss; clearing it in eval keeps a stale value out of eval losses.
        # Per-token values stay available for per-sample losses (DP ghost clipping needs one per sequence).
        self.z_tokens = torch.logsumexp(logits, dim=-1).square() if self.training else None
        self.z_loss = self.z_tokens.mean() if self.z_tokens is not None else None
        weights = self.routing_weights(logits)
        self.balance_loss = self._balance(logits, weights) if self.training else None
        if self.record:
            self.last_weights = weights.detach()
        if self.top_k >= self.num_experts:
            return self._dense(x, weights)
        return self._sparse(x, weights)

    def _balance(self, logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Switch-style load-balancing loss E * sum_e f_e * P_e (only jointly trained MoEs use it;
        FlexOlmo's anchored training does not: an owner's expert should claim only its own inputs)."""
        probs = logits.softmax(-1, dtype=torch.float32).reshape(-1, self.num_experts)
        chosen = (weights.reshape(-1, self.num_experts) > 0).float()
        return self.num_experts * (chosen.mean(0) / self.top_k * probs.mean(0)).sum()

    def _dense(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every token through every (unmasked) expert: no dispatch, best when k equals E (FlexOlmo
        expert training is top-2 of 2)."""
        out = None
        for e, expert in enumerate(self.experts):
            if not bool(self.mask[e]):
                continue
            y = weights[..., e : e + 1].to(x.dtype) * expert(x)
            out = y if out is None else out + y
        return out if out is not None else torch.zeros_like(x)

    def _sparse(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each expert only on the tokens routed to it (inference with k < E)."""
        flat_x = x.reshape(-1, x.shape[-1])
        flat_w = weights.reshape(-1, weights.shape[-1])
        out = torch.zeros_like(flat_x)
        for e, expert in enumerate(self.experts):
            idx = flat_w[:, e].nonzero(as_tuple=True)[0]
            if idx.numel() == 0:
                continue
            # index_put_ with accumulate is index_add_ (same sums, same order) but about 10x faster
            # on CPU, where index_add_ dominated the whole MoE forward.
            out.index_put_((idx,), flat_w[idx, e : e + 1].to(x.dtype) * expert(flat_x[idx]), accumulate=True)
        return out.view_as(x)


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
    anchor had stays frozen.
    """
    for p in anchor.parameters():
        p.requires_grad_(False)
    for i, layer in enumerate(decoder_layers(anchor)):
        owner = copy.deepcopy(layer.mlp).float()  # trainable master weights stay fp32
        for p in owner.parameters():
            p.requires_grad_(True)
        pub_row = RouterRow(public_rows[i])
        pub_row.requires_grad_(False)
        layer.mlp = FlexMoEBlock([layer.mlp, owner], [pub_row, RouterRow(owner_rows[i], bias_init)], top_k=2)
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
