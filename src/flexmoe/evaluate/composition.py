"""Composition metrics: does each owner's gain survive composition, and does opt-out remove only it?

One pure function turns a table of perplexities into the report block of issue 13. The perplexities come
from evaluating a handful of models on every owner domain's test split (natural log throughout):

- ``"anchor"``: the frozen public model;
- ``"composed"``: all owners' experts composed;
- ``"alone:<d>"``: the anchor plus owner d's expert only (the 2-expert model d trained);
- ``"without:<d>"``: the composed model with d removed (opt-out);
- ``"oracle:<d>"``: the composed model with tokens routed by hand to public + d only.

Per owner domain d (all ratios are fractions, not percentages):

- alone gain = log ppl_d(anchor) - log ppl_d(alone:d);
- retention = (log ppl_d(anchor) - log ppl_d(composed)) / alone gain;
- opt-out removed = (log ppl_d(without:d) - log ppl_d(composed)) / (log ppl_d(anchor) - log ppl_d(composed));
- max other change = max over the other scored domains e (the public one included) of
  |ppl_e(without:d) / ppl_e(composed) - 1|;
- oracle retention = (log ppl_d(anchor) - log ppl_d(oracle:d)) / alone gain;

and public change = ppl_public(composed) / ppl_public(anchor) - 1.

A value whose inputs are missing (no oracle run, an owner without a "without" run) or undefined (a zero
denominator, a non-finite perplexity) is ``None`` (JSON null), never a made-up number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

#: the name of the routing when nothing else is said: the composed model's own router rows
DEFAULT_ROUTING = "router"


def _log_ppl(ppl: Mapping[str, Mapping[str, float]], model: str, domain: str) -> float | None:
    value = ppl.get(model, {}).get(domain)
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        return None
    return math.log(value)


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _max_other_change(ppl: Mapping[str, Mapping[str, float]], owner: str) -> float | None:
    without = ppl.get(f"without:{owner}", {})
    composed = ppl.get("composed", {})
    changes = []
    for domain in sorted(set(without) & set(composed)):
        if domain == owner:
            continue
        lw, lc = _log_ppl(ppl, f"without:{owner}", domain), _log_ppl(ppl, "composed", domain)
        if lw is None or lc is None:
            continue
        changes.append(abs(math.exp(lw - lc) - 1.0))
    return max(changes) if changes else None


def owner_metrics(ppl: Mapping[str, Mapping[str, float]], owner: str) -> dict[str, float | None]:
    """The five per-owner numbers for one owner domain (see the module docstring)."""
    anchor = _log_ppl(ppl, "anchor", owner)
    composed = _log_ppl(ppl, "composed", owner)
    gain = _diff(anchor, _log_ppl(ppl, f"alone:{owner}", owner))
    composed_gain = _diff(anchor, composed)
    return {
        "alone_gain": gain,
        "retention": _ratio(composed_gain, gain),
        "optout_removed": _ratio(_diff(_log_ppl(ppl, f"without:{owner}", owner), composed), composed_gain),
        "max_other_change": _max_other_change(ppl, owner),
        "oracle_retention": _ratio(_diff(anchor, _log_ppl(ppl, f"oracle:{owner}", owner)), gain),
    }


def composition_metrics(
    ppl: Mapping[str, Mapping[str, float]],
    owners: Sequence[str],
    public: str = "public",
    routing: str = DEFAULT_ROUTING,
) -> dict:
    """The ``"composition"`` block of report.json from a table of perplexities.

    ``ppl`` maps a model key (``"anchor"``, ``"composed"``, ``"alone:<d>"``, ``"without:<d>"``,
    ``"oracle:<d>"``) to {domain: perplexity on that domain's test split}; ``owners`` are the owner
    domains; ``public`` names the public domain; ``routing`` names the routing method that was measured.
    """
    change = _diff(_log_ppl(ppl, "composed", public), _log_ppl(ppl, "anchor", public))
    return {
        "owners": {d: owner_metrics(ppl, d) for d in owners},
        "public_change": None if change is None else math.exp(change) - 1.0,
        "routing": routing,
    }


#: what the issue asks of each number (lower and upper bound, None = open); used by the tables and plot
TARGETS: dict[str, tuple[float | None, float | None]] = {
    "retention": (0.90, None),
    "optout_removed": (0.90, 1.10),
    "max_other_change": (None, 0.02),
    "public_change": (None, 0.02),  # a better public perplexity is no harm
}


def meets_target(name: str, value: float | None) -> bool | None:
    """Whether ``value`` meets the issue's target for metric ``name`` (None: no target or no value)."""
    if name not in TARGETS or value is None:
        return None
    low, high = TARGETS[name]
    return (low is None or value >= low) and (high is None or value <= high)
