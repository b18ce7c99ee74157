"""GRPO on verifiable rewards, as BAR's RL stage runs it: for each prompt sample a group of replies,
reward each by checking its answer, normalise rewards within the group, and take a clipped
policy-gradient step. No value model. No KL term by default (BAR: "no KL", constant LR);
``kl_coef`` > 0 adds DeepSeekMath's per-token penalty towards the model the stage started from (the k3
estimator ``exp(r - p) - (r - p) - 1`` on the sampled reply tokens): measured on the tiny demo, RL
without it costs public chat 21 points at lr 1e-4, and an RL package's shared deltas reach every owner.

A step strategy for ``flexmoe.training.train`` (``GRPOStep``): the training "blocks" are task indices
(``[n_tasks, 1]``), and ``GRPOLoss`` turns a batch of them into a loss (rollout included). Under
``torch.no_grad`` (the loop's evaluation) it returns ``1 - mean reward`` of greedy replies instead,
so the loop's validation "loss" tracks task accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flexmoe.chat import generate, prompt_ids, reply_text, well_formed
from flexmoe.chat_data import correct
from flexmoe.training import LMStep


@dataclass
class GRPOConfig:
    group_size: int = 8  # replies sampled per prompt (BAR: 8)
    clip_eps: float = 0.2
    max_new_tokens: int = 24
    temperature: float = 1.0
    kl_coef: float = 0.0  # weight of the KL penalty towards the stage's starting model (0: BAR)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``[prompts, group]`` rewards -> advantages normalised within each group (zero if all equal)."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + eps)


def clipped_pg_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, clip_eps: float
) -> torch.Tensor:
    """PPO-clip objective per token, averaged over each reply's tokens, then over replies (GRPO).

    ``logp``/``old_logp``/``mask``: ``[replies, tokens]``; ``adv``: ``[replies]``."""
    ratio = (logp - old_logp).exp()
    a = adv.unsqueeze(-1)
    per_tok = -torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    m = mask.float()
    return ((per_tok * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(policy || reference) per reply token (non-negative, unbiased on the policy's
    samples), averaged over each reply's tokens, then over replies. ``[replies, tokens]`` each."""
    d = ref_logp - logp
    per_tok = d.exp() - d - 1
    m = mask.float()
    return ((per_tok * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()


def reply_logprobs(model, prompts: Sequence[list[int]], replies: Sequence[list[int]], pad: int):
    """Log-probabilities ``[replies, max_reply_len]`` of each reply's tokens given its prompt, and the
    mask of real reply tokens. Sequences are right-padded: padding never precedes a real token."""
    seqs = [p + r for p, r in zip(prompts, replies, strict=True)]
    width = max(map(len, seqs))
    device = next(model.parameters()).device
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
    attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    tok_logp = logits.log_softmax(-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    rl = max(1, max(map(len, replies)))
    out = torch.zeros(len(seqs), rl, device=device)
    mask = torch.zeros(len(seqs), rl, dtype=torch.bool, device=device)
    for j, (p, r) in enumerate(zip(prompts, replies, strict=True)):
        if r:
            out[j, : len(r)] = tok_logp[j, len(p) - 1 : len(p) - 1 + len(r)]
            mask[j, : len(r)] = True
    return out, mask


class GRPOLoss:
    """``loss_fn(model, task_indices)`` for ``flexmoe.training.train``; keeps the last rollout's mean
    reward in ``last_reward`` (logged by the stage)."""

    def __init__(self, tasks: list[dict], tokenizer, cfg: GRPOConfig, extra_loss=None, reference=None):
        self.tasks, self.tok, self.cfg, self.extra = tasks, tokenizer, cfg, extra_loss
        self.reference = reference  # the frozen starting model, for ``cfg.kl_coef``
        self.last_reward: float | None = None

    def rewards(self, rows: list[dict], replies: list[list[int]]) -> torch.Tensor:
        return torch.tensor(
            [
                float(
                    well_formed(self.tok, r) and correct(reply_text(self.tok, r), row["answer"], row["check"])
                )
                for row, r in zip(rows, replies, strict=True)
            ]
        )

    def __call__(self, model, batch: torch.Tensor) -> torch.Tensor:
        rows = [self.tasks[int(i)] for i in batch.view(-1)]
        if not torch.is_grad_enabled():  # the loop's evaluation: greedy accuracy as 1 - reward
            replies = generate(model, self.tok, [r["messages"] for r in rows], self.cfg.max_new_tokens)
            return 1.0 - self.rewards(rows, replies).mean()
        g = self.cfg.group_size
        group_rows = [r for r in rows for _ in range(g)]
        replies = generate(
            model,
            self.tok,
            [r["messages"] for r in group_rows],
            self.cfg.max_new_tokens,
            do_sample=True,
            temperature=self.cfg.temperature,
            top_k=0,
        )
        rewards = self.rewards(group_rows, replies)
        self.last_reward = float(rewards.mean())
        adv = group_advantages(rewards.view(len(rows), g)).view(-1)
        prompts = [prompt_ids(self.tok, r["messages"]) for r in group_rows]
        logp, mask = reply_logprobs(model, prompts, replies, self.tok.pad_token_id)
        loss = clipped_pg_loss(logp, logp.detach(), adv.to(logp.device), mask, self.cfg.clip_eps)
        if self.reference is not None and self.cfg.kl_coef > 0:
            with torch.no_grad():
                ref_logp, _ = reply_logprobs(self.reference, prompts, replies, self.tok.pad_token_id)
            loss = loss + self.cfg.kl_coef * kl_penalty(logp, ref_logp, mask)
        if self.extra is not None:
            loss = loss + self.extra()
        return loss


class GRPOStep(LMStep):
    """The loop's step strategy for GRPO: ``LMStep`` with the rollout loss, the mean reward in the
    progress line, and no ``torch.compile`` (sampling changes shapes every step)."""

    supports_compile = False

    def __init__(self, loss_fn: GRPOLoss):
        super().__init__(loss_fn)

    def log_extra(self, step: int) -> str:
        r = self.loss_fn.last_reward
        return "" if r is None else f"reward {r:.3f}"
