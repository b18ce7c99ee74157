"""Sequence routing: at most one owner's expert per position, chosen from the text so far.

Why: the owners' router rows are linear, and each was trained only against public text ("mine vs
public"), never against the other owners' text, which its owner never saw. On another owner's tokens a
row's logit is arbitrary, so token by token some tokens go to a foreign expert, which harms them: on the
`small` demo, removing the legal expert *improves* code perplexity by 8%. With only public and the right
owner routable (the "oracle") every owner keeps its whole gain, so the loss is in the choice of owner,
not in the mixture. A single token is weak evidence of its domain; the prefix is strong evidence.

How (flexmoe's runtime only; the stock ``flex_olmo`` export routes by the rows):

1. Each owner's margin over public per position, from one of two kinds of evidence (``evidence``):
   - ``"likelihood"`` (default): ``log p(x_t | x_<t)`` under public + that owner (exactly the 2-expert
     model the owner trained) minus under public alone (the dense anchor): one pass per owner and one
     anchor pass. Bayes' rule on the prefix, as BTM weighs its experts, but choosing among FFN experts of
     one model, so what runs at a position is still one MoE pass with two experts.
   - ``"rows"``: each owner's router margin ``r_j.h - r_public.h`` in the anchor pass (with the learned
     biases when loaded), averaged over the MoE layers: one pass, no LM head, but a row is a weak witness
     on another owner's text (code on `small`: retention 0.69 against 0.99 with likelihood).
2. Each owner's evidence at position t: the sum of its margins over positions <= t (padding excluded),
   older positions down-weighted by ``decay`` per position. Causal, so scoring and generation see the
   decision a left-to-right reader would.
3. At t, when the owner with the most evidence leads both public (0) and the runner-up by more than
   ``confidence``, only public and that owner are routable (the rows as trained weigh the two, as in
   the owner's own 2-expert model); when every owner is more than ``confidence`` behind public, public
   only; otherwise (not decided yet) every expert, the rows choosing per token.
4. Text changes owner (a licence header, then code): the whole prefix's evidence keeps the first owner
   long after the change. So where the owner leading the recent positions (evidence decayed by
   ``switch_decay``) leads public and every other owner there by more than ``switch``, it is routed
   instead. Forgetting everywhere (``decay``) follows a change too, but sends public text that looks
   like an owner's for a few tokens to that owner; the switch needs a clear recent lead, which public
   text rarely gives.

Generation (a model call that starts a cache, as ``generate`` makes): the whole prompt is given, so
the prompt and every generated token are routed by one choice made at the prompt's end from
``prompt_evidence`` (default: the likelihood for base models; for chat models the prompt centroids
when every expert has one, ``flexmoe.prompt_centroids``, else the rows, see ``CHAT_PROMPT_EVIDENCE``)
with ``prompt_confidence`` (default 0: public or the owner with the most evidence, whichever leads), and
the switch (4.) when the prompt is read by the scoring evidence. "Not decided yet" would leave every
generated token to the rows, which is what sequence routing is there to avoid, and a chat prompt is
short: on the tiny post-training demo's math prompts the right owner leads by about 2 (rows), below
``confidence``, on every prompt. Calls without a cache (scoring, perplexity) stay causal, so no position
is ever routed by a later token; decode steps reuse the prefill's choice and cost nothing extra.

Only the owners' own models are used: no statistics, no data. Removing an owner removes a candidate, so
opt-out stays exact (the remaining owners' decisions are recomputed from what remains). Cost per call
on top of the MoE pass: likelihood, ``E`` more passes (the anchor and one per allowed owner, each the
anchor plus one FFN); rows, one (the anchor pass).

The defaults (likelihood: confidence 0.5 nats, no decay, switch 1 nat; rows: confidence 8, decay 0.98, no
switch) were chosen on the validation splits of the tiny and the `small` demo federation; BENCHMARKS.md
("Sequence routing", "Likelihood evidence", "Documents that cross owners") holds the tables.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from flexmoe.errors import FlexmoeError
from flexmoe.moe import Routing, moe_blocks, routing
from flexmoe.prompt_centroids import nearest, pooled

#: the routing name recorded in reports for models routed this way
NAME = "sequence"
#: the defaults per kind of evidence (confidence: router-margin units for the rows, nats for likelihood)
CONFIDENCE = {"likelihood": 0.5, "rows": 8.0}
DECAY = {"likelihood": 1.0, "rows": 0.98}
#: the switch margin per kind of evidence (``SequenceRouting.switch``; inf: off). Likelihood: 1 nat, chosen on
#: the valid splits of both demo presets (every single-domain number unchanged; text that changes owner
#: half-way, after the change: tiny 243 -> 189, `small` 109 -> 18 perplexity). Rows: not measured, off.
SWITCH = {"likelihood": 1.0, "rows": math.inf}
#: a chat prompt's choice reads the rows: a post-trained owner's model finds *every* chat prompt likelier
#: than the anchor does (it learned the chat format more), so there the likelihood names the most
#: chat-trained owner, not the prompt's domain (tiny post-training demo, valid prompts: math's owner
#: chosen for 12 of 40 math prompts by likelihood, 26 by the rows; public chat kept public 0 vs 32 times)
CHAT_PROMPT_EVIDENCE = "rows"
#: a prompt's choice by the nearest class mean of anchor features (``flexmoe.prompt_centroids``):
#: a kind of prompt evidence only (it chooses once per prompt, not per position)
CENTROIDS = "centroids"
#: public chat conversations a prompt choice is calibrated on (``calibrate_prompts``; the first ones given)
CALIBRATION_PROMPTS = 100
#: positions per LM-head call of the likelihood evidence (bounds its [positions, vocabulary] log-softmax)
HEAD_POSITIONS = 4096


@dataclass
class SequenceRouting:
    """The per-position expert choice of one composed model (see the module docstring)."""

    confidence: float | None = None  # None: the evidence's default (``CONFIDENCE``)
    decay: float | None = None  # None: the evidence's default (``DECAY``)
    prompt_confidence: float = 0.0
    #: follow a change of domain: where the owner leading the recent positions (evidence decayed by
    #: ``switch_decay``) leads public and every other owner there by more than ``switch``, route to it
    #: whatever the whole prefix says (None: the evidence's default, ``SWITCH``; ``math.inf``: off, the
    #: prefix's choice everywhere)
    switch: float | None = None
    switch_decay: float = 0.9
    #: positions given to one owner compute with that owner's own shared tensors (post-trained
    #: owners' embeddings and LM head, ``flexmoe.owner_tensors``) instead of their merge
    owner_tensors: bool = True
    #: where an owner's margin over public comes from: ``"rows"`` (its router row in one anchor pass) or
    #: ``"likelihood"`` (its 2-expert model's log-likelihood of each token over the anchor's, one pass
    #: per owner; ``confidence`` is then in nats)
    evidence: str = "likelihood"
    #: the evidence of a generation's one choice at the prompt's end (with its default decay); None:
    #: the runtime picks ``CHAT_PROMPT_EVIDENCE`` for a model with a chat template, else ``evidence``
    prompt_evidence: str | None = None
    #: ``hidden [N, H] -> logits [N, V]``, the LM head, set by the runtime (likelihood evidence)
    head: Callable | None = field(default=None, repr=False, init=False)
    #: ``[2, E]`` each expert's mean and spread of its rows' margin over public prompts
    #: (``calibrate_prompts``); when set, a prompt the rows give to an owner goes to the owner whose
    #: evidence stands out most from its own public level (rows differ in loudness)
    prompt_scale: torch.Tensor | None = field(default=None, repr=False)
    #: ``[E, H]`` each expert's mean prompt feature (public first, ``flexmoe.prompt_centroids``), read
    #: by the ``"centroids"`` prompt evidence; the runtime sets it from the experts' manifests
    prompt_centroids: torch.Tensor | None = field(default=None, repr=False)
    #: ``[B, E]`` the choice of the last prefill (read by the server, which keeps it per request)
    last_choice: torch.Tensor | None = field(default=None, repr=False, init=False)
    _decode: weakref.WeakKeyDictionary = field(
        default_factory=weakref.WeakKeyDictionary, repr=False, init=False
    )
    _busy: bool = field(default=False, repr=False, init=False)

    @property
    def name(self) -> str:
        """The routing name reports record: ``"sequence"``, or ``"sequence-rows"`` for the rows' evidence."""
        return NAME if self.evidence == "likelihood" else f"{NAME}-{self.evidence}"

    @property
    def prompt_kind(self) -> str:
        """The evidence a generation's prompt is chosen by: ``prompt_evidence``, else ``evidence``."""
        return self.prompt_evidence or self.evidence

    def __post_init__(self) -> None:
        prompt_kinds = (*CONFIDENCE, CENTROIDS)
        for kind, kinds in ((self.evidence, CONFIDENCE), (self.prompt_kind, prompt_kinds)):
            if kind not in kinds:
                raise FlexmoeError(
                    f"Unknown sequence-routing evidence {kind!r}.", f"use one of {', '.join(kinds)}."
                )
        if self.confidence is None:
            self.confidence = CONFIDENCE[self.evidence]
        if self.decay is None:
            self.decay = DECAY[self.evidence]
        if self.switch is None:
            self.switch = SWITCH[self.evidence]
        if not self.switch >= 0:  # NaN fails too
            raise FlexmoeError(
                f"The sequence-routing switch margin must be >= 0 nats, got {self.switch!r}.",
                "use e.g. switch=1.0, or switch=math.inf to turn the switch off.",
            )

    @torch.no_grad()
    def margins(self, model, input_ids, attention_mask, allowed=None, evidence=None) -> torch.Tensor:
        """``[B, S, E]`` each expert's margin over public per position (public's own column is 0), from
        ``evidence`` (default ``self.evidence``)."""
        if (evidence or self.evidence) == "likelihood":
            return self.likelihood_margins(model, input_ids, attention_mask, allowed)
        return self.row_margins(model, input_ids, attention_mask)

    @torch.no_grad()
    def row_margins(
        self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """``[B, S, E]`` each expert's router margin over public, averaged over the MoE layers, in the
        anchor pass (public's own column is 0)."""

        def margin(_layer, block, h):
            logits = block.router_logits(h).float()
            return logits - logits[..., :1]

        return torch.stack(self.anchor_pass(model, input_ids, attention_mask, margin)).mean(0)

    @torch.no_grad()
    def likelihood_margins(self, model, input_ids, attention_mask, allowed=None) -> torch.Tensor:
        """``[B, S, E]``: at position t, ``log p(x_t | x_<t)`` under public + expert e (e's own 2-expert
        model) minus under public alone (the anchor); 0 at the first position and after padding."""
        if self.head is None:
            raise RuntimeError("likelihood evidence needs the LM head: load with runtime.from_pretrained")
        E = moe_blocks(model)[0].num_experts
        B, S = input_ids.shape
        out = torch.zeros(B, S, E, device=input_ids.device)
        wanted = torch.ones(E, dtype=torch.bool) if allowed is None else allowed.bool().reshape(-1, E).any(0)
        base = self._token_logprobs(model, input_ids, attention_mask, None)
        for e in range(1, E):
            if bool(wanted[e]):
                out[:, 1:, e] = self._token_logprobs(model, input_ids, attention_mask, e) - base
        if attention_mask is not None:  # a token after padding was predicted from nothing
            out[:, 1:] *= (attention_mask[:, :-1] * attention_mask[:, 1:])[..., None].to(out.dtype)
        return out

    def _token_logprobs(self, model, input_ids, attention_mask, expert: int | None) -> torch.Tensor:
        """``[B, S-1]`` each next token's log-probability with public (+ ``expert``) routable: that
        owner's own model (with owner tensors, its own shared tensors: the runtime reads them from the
        per-row mask), or the public-only model."""
        decoder = model.get_decoder() if model.get_output_embeddings() is not None else model
        with self._evidence_pass(model, input_ids, expert):
            h = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        h, target = h[:, :-1], input_ids[:, 1:]
        # A few positions of every row at a time: the log-softmax of [B, n, V], not [B, S, V]; every row
        # at once, so that the head's owner-tensor hook sees the batch it was routed for.
        n = max(1, HEAD_POSITIONS // h.shape[0])
        parts = [
            self.head(h[:, i : i + n]).float().log_softmax(-1).gather(-1, target[:, i : i + n, None])
            for i in range(0, h.shape[1], n)
        ]
        return torch.cat(parts, 1).squeeze(-1) if parts else torch.zeros(target.shape, device=h.device)

    @contextlib.contextmanager
    def _evidence_pass(self, model, input_ids: torch.Tensor, expert: int | None = None, merged: bool = False):
        """Route the enclosed calls over public (+ ``expert``) and keep them from being narrowed again.
        The mask is ``[B, E]``, one row per sequence, because that is what the runtime turns into the
        owner whose shared tensors a row computes with (the anchor's for public alone); ``merged``: an
        ``[E]`` mask instead, which the runtime computes with the merged shared tensors."""
        only = torch.zeros(moe_blocks(model)[0].num_experts, dtype=torch.bool, device=input_ids.device)
        only[[0] if expert is None else [0, expert]] = True
        self._busy = True
        try:
            with routing(Routing(mask=only if merged else only.expand(input_ids.shape[0], -1))):
                yield
        finally:
            self._busy = False

    @torch.no_grad()
    def anchor_pass(self, model, input_ids, attention_mask, per_layer, merged: bool = True) -> list:
        """Run ``model`` with only public routable and return ``per_layer(layer, block, h)`` for every
        MoE block's input ``h`` (Nones left out). ``merged``: shared tensors stay merged, for the router
        rows' margins, read where the rows act (an owner's row scored on the anchor's embeddings loses
        the rows its owner trained: chat prompts of the `small` post-training demo then went to public);
        else the anchor's own tensors (what a prompt centroid was measured in)."""
        blocks = moe_blocks(model)
        seen: list = []
        hooks = [
            b.register_forward_pre_hook(lambda blk, args, i=i: seen.append(per_layer(i, blk, args[0])))
            for i, b in enumerate(blocks)
        ]
        try:
            with self._evidence_pass(model, input_ids, merged=merged):
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        return [x for x in seen if x is not None]

    def mask(
        self,
        model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        allowed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B, S, E]`` bool: the routable experts at every position (``allowed``: ``[E]`` or ``[B, E]``,
        the experts the caller permits, e.g. after ``include``/``exclude``)."""
        m = self.margins(model, input_ids, attention_mask, allowed)
        return self._decide(m, attention_mask, allowed, self.confidence, self.decay).mask()

    def _decide(self, margins, attention_mask, allowed, confidence, decay, switch: bool = True) -> Decision:
        """``decide``, overridden where the recent positions switch owner (``switch`` and not off)."""
        d = decide(margins, attention_mask, allowed, confidence, decay)
        if not switch or math.isinf(self.switch):
            return d
        return d.overridden_by(decide(margins, attention_mask, allowed, self.switch, self.switch_decay))

    def prompt_choice(self, model, input_ids, attention_mask=None, allowed=None) -> torch.Tensor:
        """``[B, E]`` the routable experts a generation keeps for each prompt: the choice at its end
        from ``prompt_evidence`` with ``prompt_confidence``."""
        kind = self.prompt_kind
        if kind == CENTROIDS:
            return self.nearest_centroid(model, input_ids, attention_mask, allowed)
        m = self.margins(model, input_ids, attention_mask, allowed, kind)
        decay = self.decay if kind == self.evidence else DECAY[kind]
        # A prompt that changes domain goes where it ends, as in scoring; the switch margin is in the
        # scoring evidence's units, so a prompt read by other evidence is not switched.
        d = self._decide(m, attention_mask, allowed, self.prompt_confidence, decay, kind == self.evidence)
        chosen = d.mask()[:, -1]
        if kind != "rows" or self.prompt_scale is None:
            return chosen
        return self._standout_owner(chosen, m, attention_mask, allowed, decay)

    def nearest_centroid(self, model, input_ids, attention_mask=None, allowed=None) -> torch.Tensor:
        """``[B, E]``: public and the owner whose prompt centroid is nearest the prompt's feature (or
        public alone), the feature read in the public-alone pass on the anchor's tensors, as the owners
        computed theirs in the anchor."""
        if self.prompt_centroids is None:
            raise FlexmoeError(
                "The centroids prompt evidence needs every expert's prompt centroid.",
                "load a model whose owners shipped them (flexmoe expert train --stage sft), or use rows.",
            )
        seen = self.anchor_pass(model, input_ids, attention_mask, lambda _i, _b, h: h, merged=False)
        features = pooled(seen, attention_mask)
        return nearest(features, self.prompt_centroids, allowed).to(input_ids.device)

    def _standout_owner(self, chosen, margins, attention_mask, allowed, decay) -> torch.Tensor:
        """``chosen`` with each single owner replaced by the allowed owner whose rows' evidence, in
        units of its own spread on public prompts, is highest: whether an owner claims the prompt stays
        the rows' call, which owner is read on a common scale."""
        mean, std = self.prompt_scale.to(margins.device)
        z = evidence((margins - mean) / std, attention_mask, decay)[:, -1]
        ok = chosen.new_ones(chosen.shape) if allowed is None else allowed.bool().expand(chosen.shape)
        best = z.masked_fill(~ok, float("-inf"))[:, 1:].argmax(-1) + 1
        one = chosen[:, 1:].sum(-1) == 1
        out = chosen.clone()
        out[one, 1:] = False
        out[one, best[one]] = True
        return out

    @torch.no_grad()
    def calibrate_prompts(self, model, prompts: list[list[int]]) -> None:
        """Set ``prompt_scale`` from public prompts (token ids): each expert's mean and spread of its
        rows' margin over their tokens. Public text only, so any operator can compute it."""
        device = moe_blocks(model)[0].router[0].weight.device
        m = torch.cat([self.row_margins(model, torch.tensor([p], device=device), None)[0] for p in prompts])
        mean, std = m.mean(0), m.std(0).clamp_min(1e-6)
        mean[0], std[0] = 0.0, 1.0
        self.prompt_scale = torch.stack([mean, std]).cpu()

    def mask_for_call(self, model, input_ids, attention_mask, cache, allowed) -> torch.Tensor | None:
        """The mask of one model call: per position in a full or prefill call; in a decode step (a
        cache that already holds tokens) the choice at the end of that cache's prefill."""
        if self._busy or input_ids is None:
            return None
        extends = attention_mask is not None and attention_mask.shape[-1] > input_ids.shape[-1]
        if extends or (cache is not None and _cache_length(cache) > 0):
            return self._decode.get(cache) if cache is not None else None
        if cache is None:  # scoring: causal, each position from the text up to it
            return self.mask(model, input_ids, attention_mask, allowed)
        # The prefill of a generation (a call that starts a cache): the whole prompt is given, so it
        # and everything generated after it are routed by the choice made at its end.
        last = self.prompt_choice(model, input_ids, attention_mask, allowed)
        self._decode[cache] = self.last_choice = last
        return last[:, None, :].expand(-1, input_ids.shape[1], -1)


def evidence(margins: torch.Tensor, attention_mask: torch.Tensor | None = None, decay: float = 1.0):
    """``[B, S, E]`` each expert's evidence at every position: the sum of its margins over the valid
    positions so far, older ones down-weighted by ``decay`` per position (1: a plain running sum)."""
    B, S, E = margins.shape
    valid = torch.ones(B, S, device=margins.device) if attention_mask is None else attention_mask.float()
    x = margins.double() * valid[..., None]
    if decay == 1.0:
        return x.cumsum(1)
    out, acc = torch.empty_like(x), torch.zeros_like(x[:, 0])
    for t in range(S):
        acc = decay * acc + x[:, t]
        out[:, t] = acc
    return out


@dataclass
class Decision:
    """Per position ``[B, S]``: whether one owner is chosen (``decided``, the owner ``which``, 1-based),
    or public only; ``ok`` ``[B, S, E]`` the experts the caller allows."""

    ok: torch.Tensor
    decided: torch.Tensor
    public_only: torch.Tensor
    which: torch.Tensor

    def overridden_by(self, other: Decision) -> Decision:
        """``other``'s owner wherever ``other`` decided, this decision elsewhere."""
        return Decision(
            self.ok,
            self.decided | other.decided,
            self.public_only & ~other.decided,
            torch.where(other.decided, other.which, self.which),
        )

    def mask(self) -> torch.Tensor:
        """``[B, S, E]`` bool: public and the owner where decided, public only, or every allowed expert."""
        out = self.ok.clone()
        owner_cols = torch.zeros_like(out)
        owner_cols.scatter_(-1, self.which[..., None], True)
        settled = (self.decided | self.public_only)[..., None]
        out[..., 1:] &= ~settled | owner_cols[..., 1:] & self.decided[..., None]
        return out


def decide(
    margins: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
    confidence: float = 0.0,
    decay: float = 1.0,
) -> Decision:
    """With ``e`` the evidence (``evidence``) and ``b`` the allowed owner with the most: decided for
    ``b`` when ``e_b`` beats both public (0) and the runner-up by more than ``confidence``; public only
    when every owner's evidence is below ``-confidence``; otherwise not decided."""
    B, S, E = margins.shape
    ok = torch.ones(B, E, dtype=torch.bool, device=margins.device) if allowed is None else allowed.bool()
    ok = (ok.expand(B, E) if ok.dim() == 1 else ok)[:, None, :].expand(B, S, E)
    if E == 1:
        none = torch.zeros(B, S, dtype=torch.bool, device=margins.device)
        return Decision(ok, none, none, torch.zeros(B, S, dtype=torch.long, device=margins.device))
    e = evidence(margins, attention_mask, decay)[..., 1:].masked_fill(~ok[..., 1:], float("-inf"))
    top = e.topk(min(2, E - 1), dim=-1)
    best, which = top.values[..., 0], top.indices[..., 0]
    runner = top.values[..., 1].clamp_min(0.0) if E > 2 else torch.zeros_like(best)
    return Decision(ok, best - runner > confidence, best < -confidence, which + 1)


def choose(
    margins: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
    confidence: float = 0.0,
    decay: float = 1.0,
) -> torch.Tensor:
    """The routable experts ``[B, S, E]`` from per-position margins over public ``[B, S, E]``: public and
    the decided owner, public only, or (not yet decided) every allowed expert, the rows choosing per
    token (``decide``)."""
    return decide(margins, attention_mask, allowed, confidence, decay).mask()


def _cache_length(cache) -> int:
    get = getattr(cache, "get_seq_length", None)
    return int(get()) if get is not None else 0
