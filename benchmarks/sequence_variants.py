"""Two variants of sequence routing's rule, measured with ``benchmarks/sequence_routing.py`` on a demo
workdir (neither is in the library: both were measured no better, BENCHMARKS.md):

- ``public-lead=P``: an owner is chosen only when its evidence also leads public by more than ``P``
  (the rule asks for ``confidence``); positions that fail it stay undecided;
- ``undecided-public``: undecided positions route to public only (owners only once decided).

    PYTHONPATH=src python benchmarks/sequence_variants.py public-lead=16 --workdir demo-run \\
        --split valid --grid 8:0.98 --json out.json
"""

import runpy
import sys
from pathlib import Path

import torch

import flexmoe.sequence_routing as sr

_rule = sr.choose


def _allowed(allowed, out: torch.Tensor) -> torch.Tensor:
    if allowed is None:
        return torch.ones_like(out)
    a = allowed.bool()
    return (a if a.dim() == 2 else a.expand(out.shape[0], -1))[:, None, :].expand_as(out)


def public_lead(p: float):
    def choose(margins, attention_mask=None, allowed=None, confidence=0.0, decay=1.0):
        out = _rule(margins, attention_mask, allowed, confidence, decay)
        if p <= confidence or margins.shape[-1] <= 1:
            return out
        e = sr.evidence(margins, attention_mask, decay)[..., 1:]
        e = e.masked_fill(~_allowed(allowed, out)[..., 1:], float("-inf"))
        weak = (out[..., 1:].sum(-1) == 1) & (e.max(-1).values <= p)
        return torch.where(weak[..., None], _allowed(allowed, out), out)

    return choose


def undecided_public(margins, attention_mask=None, allowed=None, confidence=0.0, decay=1.0):
    out = _rule(margins, attention_mask, allowed, confidence, decay)
    if margins.shape[-1] <= 2:
        return out
    public = torch.zeros_like(out)
    public[..., 0] = out[..., 0]
    return torch.where((out[..., 1:].sum(-1) > 1)[..., None], public, out)


if __name__ == "__main__":
    variant, rest = sys.argv[1], sys.argv[2:]
    if variant.startswith("public-lead="):
        sr.choose = public_lead(float(variant.split("=", 1)[1]))
    elif variant == "undecided-public":
        sr.choose = undecided_public
    else:
        raise SystemExit(f"unknown variant {variant!r}: public-lead=P or undecided-public")
    sys.argv = ["sequence_routing.py", *rest]
    runpy.run_path(str(Path(__file__).with_name("sequence_routing.py")), run_name="__main__")
