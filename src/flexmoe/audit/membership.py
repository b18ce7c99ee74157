"""Loss-based membership inference (Yeom et al. 2018): training documents tend to have lower loss.

The attacker scores each document by minus its mean per-token loss; the AUC is the probability that a
random training document scores higher than a random held-out one (ties count one half). 0.5 is
chance; 1.0 separates members perfectly. The interval is Hanley and McNeil's (1982) normal
approximation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from flexmoe.data import tokenize
from flexmoe.errors import FlexmoeError
from flexmoe.evaluate.metrics import sequence_nll


def auc(members: Sequence[float], non_members: Sequence[float]) -> float:
    """P(member score > non-member score) + 0.5 P(equal): the Mann-Whitney U statistic over n1*n2."""
    if not members or not non_members:
        raise FlexmoeError("Membership AUC needs members and non-members.", "pass documents of both.")
    m = torch.tensor(members, dtype=torch.float64)[:, None]
    n = torch.tensor(non_members, dtype=torch.float64)[None, :]
    return float(((m > n).double() + 0.5 * (m == n).double()).mean())


def auc_interval(a: float, n1: int, n2: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of an AUC from ``n1`` positives and ``n2`` negatives (Hanley and McNeil)."""
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n2 - 1) * (q2 - a * a)) / (n1 * n2)
    h = z * math.sqrt(max(var, 0.0))
    return (max(0.0, a - h), min(1.0, a + h))


def document_losses(lm, docs: Sequence[str], max_tokens: int = 256, batch_size: int = 16) -> list[float]:
    """Mean next-token loss of each document's first ``max_tokens`` tokens."""
    return sequence_losses(lm, [x[:max_tokens] for x in tokenize(list(docs), lm.tokenizer)], batch_size)


def sequence_losses(lm, ids: Sequence[Sequence[int]], batch_size: int = 16) -> list[float]:
    """Mean next-token loss of each token sequence (e.g. the packed blocks a model trained on)."""
    nll, n = sequence_nll(lm, ids, batch_size)
    return (nll / n.clamp_min(1)).tolist()


def membership_auc(lm, members: Sequence[str], non_members: Sequence[str], max_tokens: int = 256) -> dict:
    """The loss attack's AUC on ``members`` (training documents) vs ``non_members`` (held out)."""
    lm_in, lm_out = document_losses(lm, members, max_tokens), document_losses(lm, non_members, max_tokens)
    return _result(lm_in, lm_out, max_tokens)


def membership_auc_blocks(lm, members: torch.Tensor, non_members: torch.Tensor) -> dict:
    """The same on token blocks ``[n, T]``: the unit that sequence-level DP protects."""
    t = members.shape[1]
    return _result(sequence_losses(lm, members.tolist()), sequence_losses(lm, non_members.tolist()), t)


def _result(lm_in: list[float], lm_out: list[float], max_tokens: int) -> dict:
    a = auc([-x for x in lm_in], [-x for x in lm_out])
    return {
        "auc": a,
        "ci95": list(auc_interval(a, len(lm_in), len(lm_out))),
        "members": len(lm_in),
        "non_members": len(lm_out),
        "member_loss": sum(lm_in) / len(lm_in),
        "non_member_loss": sum(lm_out) / len(lm_out),
        "max_tokens": max_tokens,
    }
