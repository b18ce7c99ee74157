"""The paper's baselines, all built from the same anchor and the same per-domain token budget.

- ``dense_expert``: the anchor fully fine-tuned on one domain (the paper's "individual experts").
- ``soup``: the uniform weight average of dense models (the public anchor and the dense experts).
- ``BTMLM``: per-input ensemble of dense models' next-token distributions, weights
  softmax(-mean NLL / tau) over the prompt (or, for perplexity, over the tokens seen so far), top-2.
- ``btx``: dense models upcycled into an MoE (shared weights averaged, one FFN each), router trained
  on public data only.
- ``unrestricted_moe``: an MoE started from the anchor and trained on all domains pooled, everything
  trainable, with the same total training FLOPs as the FlexOlmo experts (the upper bound that needs
  data sharing).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from transformers import AutoConfig, AutoModelForCausalLM

from flexmoe.data import blocks_for, load_splits
from flexmoe.errors import FlexmoeError
from flexmoe.expert.train import mixed_public_blocks
from flexmoe.fileio import atomic_dir, read_json, write_json
from flexmoe.moe import FlexMoEBlock, RouterRow, balance_loss, decoder_layers, router_z_loss
from flexmoe.training import LMStep, PackedBlocks, RunOptions, Stage, TrainConfig, lm_loss, train


def train_flops_per_token(config, kind: str, seq_len: int, experts: int = 2, top_k: int = 2) -> float:
    """Training FLOPs per token from shapes (matmuls only, plus causal attention scores).

    dense: 3x forward. anchored (FlexOlmo owner): forward through both FFNs, input gradients through
    everything (one more forward), weight gradients for the owner FFN only. moe: 3x forward of a
    top-k MoE with everything trainable.
    """
    H, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    attn, ffn, head = 4 * H * H, 3 * H * config.intermediate_size, V * H
    scores = 2 * seq_len * H  # QK^T and AV, averaged over causal positions
    fwd_one = 2 * (L * (attn + ffn) + head) + L * scores
    if kind == "dense":
        return 3 * fwd_one
    if kind == "anchored":
        fwd = fwd_one + 2 * L * ffn
        return 2 * fwd + 2 * L * ffn
    if kind == "moe":
        return 3 * (fwd_one + 2 * L * ffn * (top_k - 1))
    raise ValueError(kind)


def inference_cost(config, kind: str, seq_len: int, models: int = 1, top_k: int = 1) -> dict:
    """Inference cost per token: dense forward passes and matmul FLOPs (same shape model as above).

    dense / soup: one dense pass. moe (FlexOlmo, BTX, unrestricted): one pass through top_k FFNs.
    ensemble (BTM): ``models`` full dense passes, since the ensemble weights need every model's
    likelihood of the context."""
    fwd_one = train_flops_per_token(config, "dense", seq_len) / 3
    ffn = 2 * 3 * config.hidden_size * config.intermediate_size * config.num_hidden_layers
    if kind == "dense":
        return {"forward_passes": 1, "flops": fwd_one}
    if kind == "moe":
        return {"forward_passes": 1, "flops": fwd_one + ffn * (top_k - 1)}
    if kind == "ensemble":
        return {"forward_passes": models, "flops": models * fwd_one}
    raise ValueError(kind)


@dataclass
class BaselineTraining:
    """How a baseline trains (the same token budget as the FlexOlmo experts it is compared with)."""

    steps: int = 100
    batch_size: int = 8
    seq_len: int = 256
    lr: float | None = None  # None: the baseline's own default
    seed: int = 0
    # Dense experts: the share of public sequences mixed into the domain's, as the owners' experts get
    # (``ExpertTrainSettings.public_mix``), so that both see the same stream (0: the domain alone).
    public_mix: float = 0.0
    quiet: bool = True


def _cfg(t: BaselineTraining, default_lr: float) -> TrainConfig:
    return TrainConfig(
        steps=t.steps,
        batch_size=t.batch_size,
        seq_len=t.seq_len,
        lr=t.lr or default_lr,
        warmup_steps=max(1, t.steps // 10),
        weight_decay=0.0,
        eval_every=max(1, t.steps // 2),
        checkpoint_every=10**9,
        log_every=max(1, t.steps // 5),
        seed=t.seed,
    )


def dense_expert(
    anchor,
    tokenizer,
    data: Path,
    settings: BaselineTraining | None = None,
    public: Path | None = None,
    **overrides,
):
    """The anchor fully fine-tuned on one domain (with ``public`` documents mixed in at
    ``public_mix``); returns the model (a copy) and its training result. ``settings`` (or keyword
    ``overrides`` of its fields) say how; lr defaults to 1e-3."""
    t = replace(settings or BaselineTraining(), **overrides)
    model = copy.deepcopy(anchor).train()
    for p in model.parameters():
        p.requires_grad_(True)
    stage = Stage(
        PackedBlocks(dense_blocks(data, tokenizer, t, public)),
        blocks_for(load_splits([data]).valid, tokenizer, t.seq_len),
        desc=f"dense {Path(data).name}",
    )
    result = train(model, _cfg(t, 1e-3), stage, RunOptions(quiet=t.quiet))
    return model.eval(), result


def dense_blocks(data: Path, tokenizer, t: BaselineTraining, public: Path | None = None) -> torch.Tensor:
    """A dense expert's training blocks: the domain's, then ``public_mix`` of public ones when
    ``public`` is given (the owners' stream, ``flexmoe.expert.train.mixed_public_blocks``)."""
    blocks = blocks_for(load_splits([data]).train, tokenizer, t.seq_len)
    if public is None or t.public_mix <= 0:
        return blocks
    pub = blocks_for(load_splits([public]).train, tokenizer, t.seq_len)
    return torch.cat([blocks, mixed_public_blocks(pub, len(blocks), t.public_mix)])


@torch.no_grad()
def soup(models: Sequence[torch.nn.Module]):
    """Uniform weight average of models of one architecture."""
    out = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    out.load_state_dict({k: sum(s[k].float() for s in states) / len(states) for k in states[0]})
    return out.eval()


class BTMLM:
    """Branch-Train-Merge ensemble behind the ``log_probs`` interface of ``metrics``."""

    def __init__(self, lms: Sequence, tau: float = 0.1, top: int = 2):
        self.lms, self.tau, self.top = list(lms), tau, top
        self.tokenizer = self.lms[0].tokenizer

    @torch.no_grad()
    def _weights(
        self, tok_lp: torch.Tensor, mask: torch.Tensor, prefix_len: torch.Tensor | None
    ) -> torch.Tensor:
        """``[M, B, T-1]`` mixture weights for predicting token t+1 from the prompt or the tokens so far."""
        nll, valid = -tok_lp, mask[:, 1:].float()
        if prefix_len is not None:  # weights from the prompt only, the same at every position
            use = valid * (torch.arange(nll.shape[-1])[None] < (prefix_len[:, None] - 1)).float()
            mean = ((nll * use).sum(-1) / use.sum(-1).clamp_min(1))[..., None].expand_as(nll)
        else:  # weights from the tokens seen before each prediction (uniform at the first one)
            cum = (nll * valid).cumsum(-1) / valid.cumsum(-1).clamp_min(1)
            mean = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], dim=-1)
        return self.top_weights(mean)

    def top_weights(self, mean_nll: torch.Tensor) -> torch.Tensor:
        """softmax(-mean NLL / tau) over the models (dim 0), renormalised over the ``top`` largest."""
        w = torch.softmax(-mean_nll / self.tau, dim=0)
        if self.top < len(self.lms):
            kth = w.topk(self.top, dim=0).values[-1:]
            w = torch.where(w >= kth, w, torch.zeros_like(w))
            w = w / w.sum(0, keepdim=True)
        return w

    @torch.no_grad()
    def token_logprobs(self, ids: torch.Tensor, mask: torch.Tensor, prefix_len: torch.Tensor | None = None):
        lps = torch.stack([lm.token_logprobs(ids, mask) for lm in self.lms])  # [M, B, T-1]
        w = self._weights(lps, mask, prefix_len)
        return torch.logsumexp(lps + w.clamp_min(1e-30).log(), dim=0)

    @torch.no_grad()
    def next_logprobs(self, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor):
        """Generation: weights from the whole prompt so far (every real token), then mix distributions."""
        lps = torch.stack([lm.token_logprobs(ids, mask) for lm in self.lms])
        w = self._weights(lps, mask, last + 1)[:, :, 0]  # [M, B]
        nxt = torch.stack([lm.next_logprobs(ids, mask, last) for lm in self.lms])  # [M, B, V]
        return torch.logsumexp(nxt + w.clamp_min(1e-30).log()[..., None], dim=0)


def _moe_from(models: Sequence[torch.nn.Module], top_k: int, rows: torch.Tensor | None = None, seed: int = 0):
    """An MoE whose shared weights are the average of ``models`` and whose experts are their FFNs."""
    base = soup(models)
    g = torch.Generator().manual_seed(seed)
    H = base.config.hidden_size
    for i, layer in enumerate(decoder_layers(base)):
        experts = [copy.deepcopy(decoder_layers(m)[i].mlp) for m in models]
        init = rows[i] if rows is not None else torch.randn(len(models), H, generator=g) * 0.02
        init = init.to(next(layer.parameters()).device)
        rows_e = [RouterRow(init[e]) for e in range(len(models))]
        layer.mlp = FlexMoEBlock(experts, rows_e, top_k=top_k, normalize_topk=True)
    return base


def _train_router_only(model, tokenizer, public: Path, t: BaselineTraining):
    for n, p in model.named_parameters():
        p.requires_grad_(".mlp.router." in n and n.endswith("weight"))
    splits = load_splits([public])

    def loss_fn(m, b):
        loss = lm_loss(m, b)
        return loss + 1e-3 * router_z_loss(model).to(loss.device)

    stage = Stage(
        PackedBlocks(blocks_for(splits.train, tokenizer, t.seq_len)),
        blocks_for(splits.valid, tokenizer, t.seq_len),
        LMStep(loss_fn),
        desc="btx router",
    )
    return train(model, _cfg(t, 1e-2), stage, RunOptions(quiet=t.quiet))


def btx(
    models: Sequence[torch.nn.Module],
    tokenizer,
    public: Path,
    *,
    top_k: int,
    settings: BaselineTraining | None = None,
    **overrides,
):
    """Upcycle dense models into an MoE and train only its router on public data (lr default 1e-2)."""
    t = replace(settings or BaselineTraining(), **overrides)
    model = _moe_from(models, top_k, seed=t.seed).train()
    result = _train_router_only(model, tokenizer, public, t)
    return model.eval(), result


def unrestricted_moe(
    anchor,
    tokenizer,
    data: Sequence[Path],
    *,
    experts: int,
    top_k: int,
    settings: BaselineTraining | None = None,
    **overrides,
):
    """An MoE from the anchor trained on all data pooled, everything trainable (needs data sharing;
    lr default 1e-3)."""
    t = replace(settings or BaselineTraining(), **overrides)
    model = _moe_from([anchor] * experts, top_k, seed=t.seed).train()
    for p in model.parameters():
        p.requires_grad_(True)
    docs_train, docs_valid = [], []
    for d in data:
        s = load_splits([d])
        docs_train += s.train
        docs_valid += s.valid

    def loss_fn(m, b):
        loss = lm_loss(m, b)
        return loss + 1e-3 * router_z_loss(model).to(loss.device) + 1e-2 * balance_loss(model).to(loss.device)

    stage = Stage(
        PackedBlocks(blocks_for(docs_train, tokenizer, t.seq_len)),
        blocks_for(docs_valid, tokenizer, t.seq_len),
        LMStep(loss_fn),
        desc="unrestricted moe",
    )
    result = train(model, _cfg(t, 1e-3), stage, RunOptions(quiet=t.quiet))
    return model.eval(), result


# An upcycled MoE (``btx``, ``unrestricted_moe``) on disk: its weights, the dense config it was built
# from (under another name: the directory is not a dense HF model and must not load as one) and this.
UPCYCLED = "upcycled.json"
_UPCYCLED_WEIGHTS = "upcycled.safetensors"
_DENSE_CONFIG = "dense_config.json"


def save_upcycled(model, tokenizer, out: Path, files: dict | None = None) -> None:
    """Write an upcycled MoE to ``out`` atomically (``files``: name -> JSON object written beside it)."""
    layer = decoder_layers(model)[0].mlp
    with atomic_dir(out, force=True) as tmp:
        save_model(model, str(tmp / _UPCYCLED_WEIGHTS))  # tied embeddings are stored once
        (tmp / _DENSE_CONFIG).write_text(model.config.to_json_string())
        tokenizer.save_pretrained(str(tmp))
        write_json(tmp / UPCYCLED, {"experts": len(layer.experts), "top_k": layer.top_k})
        for name, obj in (files or {}).items():
            write_json(tmp / name, obj)


def load_upcycled(path: Path, device: str = "cpu"):
    """The MoE ``save_upcycled`` wrote, in eval mode on ``device``."""
    path = Path(path)
    meta = read_json(path / UPCYCLED)
    config = AutoConfig.from_pretrained(str(path / _DENSE_CONFIG))
    model = _moe_from([AutoModelForCausalLM.from_config(config)] * meta["experts"], meta["top_k"])
    try:
        load_model(model, str(path / _UPCYCLED_WEIGHTS))
    except (OSError, RuntimeError, SafetensorError) as e:  # missing, corrupt, mismatched tensors
        raise FlexmoeError(
            f"{path} does not hold the upcycled MoE its {UPCYCLED} describes ({str(e)[:200]}).",
            "rebuild it (delete the directory and rerun the demo, which retrains it).",
        ) from e
    return model.to(device).eval()
