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
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from flexmoe.anchor import load_anchor
from flexmoe.compose import (
    PUBLIC,
    UNSIGNED_OK,
    ComposeSettings,
    Provenance,
    compose,
    package_expert,
    read_tensor,
    remove,
)
from flexmoe.data import read_documents
from flexmoe.errors import FlexmoeError
from flexmoe.evaluate.metrics import HFLM, perplexity
from flexmoe.evaluate.run import find_domains, load_lm
from flexmoe.expert.package import MANIFEST, TENSOR_FILE
from flexmoe.expert.package import check as check_package
from flexmoe.fileio import read_json
from flexmoe.moe import moe_blocks
from flexmoe.moe import routing as moe_routing
from flexmoe.runtime import from_pretrained
from flexmoe.sequence_routing import SequenceRouting
from flexmoe.signing import ALLOW_UNSIGNED, Trust

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


# --------------------------------------------------------------------------------------------------
# Measuring the perplexities: one loaded composed model, experts switched by masks


@dataclass
class CompositionSetup:
    """What to measure: a composed model, a data path with the owner domains' test splits, and how."""

    model: Path
    data: Path
    owners: Sequence[str] | None = None  # default: every expert of the model with a test split in data
    public: str = "public"
    anchor: Path | None = None  # the dense anchor; default: the composed model with only public routed
    packages: Sequence[Path] = ()  # the owners' packages, to check that alone:d is what d trained
    seq_len: int = 256
    max_blocks: int | None = 64
    max_docs: int | None = None
    device: str = "cpu"
    trust: Trust | None = None  # the model's signature (runtime.from_pretrained); None: any valid one
    # composed and without:d routed per position by flexmoe.sequence_routing (flexmoe's runtime only);
    # alone:d and oracle:d stay what they are defined as (public + d by the rows), except the oracle of
    # merged shared tensors, which is sequence routing over public + d (d's own tensors)
    sequence_routing: bool | SequenceRouting = False  # True: the defaults


def _bias_switch(model) -> Callable[[bool], None]:
    """Turn the learned router biases (loaded with ``use_bias``) on and off in place."""

    rows = [row for block in moe_blocks(model) for row in block.router]
    saved = [row.bias_raw.detach().clone() for row in rows]

    @torch.no_grad()
    def switch(on: bool) -> None:
        for row, b in zip(rows, saved, strict=True):
            row.bias_raw.copy_(b if on else torch.zeros_like(b))

    return switch


def alone_is_restricted(composed, packages: Sequence[Path]) -> dict[str, bool]:
    """Per package: whether the composed model restricted to {public, d} with d's bias is exactly the
    2-expert model d trained (same public row, d's row and bias unaltered, at least top-2)."""

    blocks = moe_blocks(composed.model)
    out = {}
    # Merged shared tensors (owners' embedding rows) hold every owner's change: no mask undoes them.
    merged = bool(composed.meta.get("shared_merge"))
    for p in packages:
        ex = package_expert(Path(p), check_package(Path(p)))
        if ex.name not in composed.names:
            continue
        e = composed.names.index(ex.name)
        pub = [package_tensor(p, f"layers.{i}.public_router.weight") for i in range(len(blocks))]
        out[ex.name] = not merged and all(
            b.top_k >= 2
            and torch.equal(b.router[e].weight.detach().cpu().view(-1), ex.row(i).float().view(-1))
            and torch.equal(b.router[0].weight.detach().cpu().view(-1), pub[i].float().view(-1))
            and float(b.router[e].bias_raw.detach()) == ex.bias(i)
            for i, b in enumerate(blocks)
        )
    return out


def package_tensor(package: Path, name: str) -> torch.Tensor:

    return read_tensor(Path(package) / TENSOR_FILE, name)


def _owners(setup: CompositionSetup, names: Sequence[str], domains: Sequence[str]) -> list[str]:

    experts = [n for n in names if n != PUBLIC]
    if setup.owners is None:
        owners = [n for n in experts if n in domains]
        if not owners:
            raise FlexmoeError(
                f"No expert of {setup.model} ({', '.join(experts)}) has a test split in {setup.data}.",
                "name the owner domains' folders after the experts, or pass --owner NAME.",
            )
        return owners
    missing = [d for d in setup.owners if d not in experts or d not in domains]
    if missing:
        raise FlexmoeError(
            f"Owner(s) {', '.join(missing)} need both an expert in {setup.model} and a test split in "
            f"{setup.data}.",
            f"experts: {', '.join(experts)}; domains: {', '.join(domains)}.",
        )
    return list(setup.owners)


def _separate_alone(setup: CompositionSetup, package: Path, tmp: Path, anchor: Path):
    """The 2-expert model an owner trained, composed from its package alone (with its bias)."""

    out = tmp / f"alone_{package_expert_name(package)}"  # package folders may share a name ("expert")
    compose(anchor, [package], out, ComposeSettings(top_k=2), provenance=UNSIGNED_OK)
    # A temporary model of this process's own making: it is not signed.
    return load_lm(out, use_bias=True, device=setup.device, trust=ALLOW_UNSIGNED)


def _separate_without(setup: CompositionSetup, owner: str, tmp: Path):
    """without:d of a model whose shared tensors merge the owners' deltas: the model re-merged without d
    (``compose.remove``, exact opt-out), since masking d's expert would leave its rows in place."""
    out = tmp / f"without_{owner}"
    remove(setup.model, owner, out, provenance=Provenance(trust=setup.trust or Trust()))
    return load_lm(out, device=setup.device, trust=ALLOW_UNSIGNED, sequence_routing=setup.sequence_routing)


def _remerged_alone(setup: CompositionSetup, names: Sequence[str], owner: str, tmp: Path):
    """alone:d of a model with merged shared tensors and no package at hand: the model re-merged down
    to d (every other owner removed by ``compose.remove``), which is what d's package composes to."""
    current, trust = setup.model, Provenance(trust=setup.trust or Trust())
    for i, other in enumerate(n for n in names[1:] if n != owner):
        out = tmp / f"alone_{owner}_{i}"
        remove(current, other, out, provenance=trust)
        if current != setup.model:
            shutil.rmtree(current)  # each step needs only the previous one
        current, trust = out, UNSIGNED_OK  # a temporary model of this process's own making
    return load_lm(current, use_bias=True, device=setup.device, trust=ALLOW_UNSIGNED)


class _Bench:
    """One loaded composed model (biases loaded, switchable), the test documents, the growing table."""

    def __init__(self, setup: CompositionSetup, docs: dict[str, list[str]], progress=None):

        self.setup, self.docs, self.progress = setup, docs, progress
        self.c = from_pretrained(
            setup.model,
            use_bias=True,
            device=setup.device,
            trust=setup.trust,
            sequence_routing=setup.sequence_routing,
        )
        self.sequence = self.c.sequence
        self.same = alone_is_restricted(self.c, setup.packages)  # before any bias is switched off
        self.merged = bool(self.c.meta.get("shared_merge"))
        self.bias = _bias_switch(self.c.model)
        self.lm = HFLM(self.c.model, self.c.tokenizer, scope=lambda: moe_routing(self.c.routing()))
        self.table: dict[str, dict[str, float]] = {}

    def score(self, key: str, lm, domains: Sequence[str]) -> None:

        for d in domains:
            r = perplexity(lm, self.docs[d], self.setup.seq_len, max_blocks=self.setup.max_blocks)
            self.table.setdefault(key, {})[d] = r["perplexity"]
            if self.progress:
                self.progress(f"{key:>16s} {d:>10s} ppl {r['perplexity']:.3f}")

    def masked(
        self, key, domains, include=None, exclude=None, with_bias: bool = False, by_rows=False
    ) -> None:
        """Score ``key`` with the experts chosen by mask (``by_rows``: never sequence-routed)."""
        self.c.set_experts(include, exclude)
        self.bias(with_bias)
        self.c.sequence = None if by_rows else self.sequence
        self.score(key, self.lm, domains)

    def alone(self, d: str, tmp: Path) -> str:
        """alone:d, by mask when that is exactly the owner's model, else from its package (or, merged
        shared tensors and no package, the model re-merged down to d); says which."""
        pkg = next((p for p in self.setup.packages if package_expert_name(p) == d), None)
        if pkg is not None and not self.same.get(d, False):
            anchor = self.setup.anchor or Path(self.c.meta["anchor"]["path"])
            self.score(f"alone:{d}", _separate_alone(self.setup, pkg, tmp, anchor), [d])
            return "the owner's package composed alone (2 experts, its bias)"
        if self.merged and len(self.c.names) > 2:  # a mask cannot take the other owners' rows out
            self.score(f"alone:{d}", _remerged_alone(self.setup, self.c.names, d, tmp), [d])
            return "the model re-merged down to the owner (every other owner removed, its bias)"
        self.masked(f"alone:{d}", [d], include=[d], with_bias=True, by_rows=True)
        how = "composed model restricted to public + owner, with the owner's bias"
        return how + (" (checked: = the owner's 2-expert model)" if self.same.get(d) else " (unchecked)")

    def without(self, d: str, scored: Sequence[str], tmp: Path) -> None:
        """without:d by mask, or (merged shared tensors, two owners or more) the re-merged model."""
        if not self.merged:
            self.masked(f"without:{d}", scored, exclude=[d])
        elif len(self.c.names) > 2:
            self.score(f"without:{d}", _separate_without(self.setup, d, tmp), scored)
        else:  # the only owner: without it, the anchor
            self.table[f"without:{d}"] = dict(self.table["anchor"])


def composition_perplexities(setup: CompositionSetup, progress=None) -> tuple[dict, dict]:
    """``(ppl, info)``: the perplexity table ``composition_metrics`` takes, measured with one loaded
    composed model whose experts are switched by masks (masking equals physical removal, except for
    merged shared tensors: then without:d is the re-merged model and alone:d the package), and notes on
    how each model key was obtained."""

    found = find_domains(setup.data)
    if setup.public not in found:
        raise FlexmoeError(
            f"{setup.data} has no test split for the public domain {setup.public!r}.",
            "add public/test.jsonl or pass --public NAME.",
        )
    bench = _Bench(setup, {d: read_documents(found[d])[: setup.max_docs] for d in found}, progress)
    c = bench.c
    owners = _owners(setup, c.names, list(found))
    scored = [setup.public, *owners]
    routed = bench.sequence.name if setup.sequence_routing else routing_name(c.meta)
    info = {"owners": owners, "routing": routed, "alone": {}}
    info["without"] = "re-merged without the owner (compose.remove)" if bench.merged else "masked"
    anchor = setup.anchor or (Path(c.meta["anchor"]["path"]) if bench.merged else None)
    if anchor is not None:
        bench.score("anchor", HFLM(load_anchor(anchor).to(setup.device).eval(), c.tokenizer), scored)
        info["anchor"] = str(anchor)
    else:
        bench.masked("anchor", scored, exclude=[n for n in c.names if n != c.names[0]])
        info["anchor"] = "the composed model with only the public expert routed"
    bench.masked("composed", scored)
    # Merged shared tensors under sequence routing: the oracle is sequence routing over public + d, whose
    # positions given to d compute with d's own tensors, as the runtime does once d is chosen (by the
    # rows every position would keep the merge of every owner's rows).
    own_tensors = bench.merged and bool(setup.sequence_routing)
    info["oracle"] = "sequence routing, public + owner" if own_tensors else "public + owner by the rows"
    with tempfile.TemporaryDirectory() as tmp:
        for d in owners:
            bench.without(d, scored, Path(tmp))
            bench.masked(f"oracle:{d}", [d], include=[d], by_rows=not own_tensors)
            info["alone"][d] = bench.alone(d, Path(tmp))
    c.set_experts(None, None)
    bench.bias(False)
    c.sequence = bench.sequence
    return bench.table, info


def package_expert_name(package: Path) -> str:

    return read_json(Path(package) / MANIFEST)["name"]


def routing_name(meta: dict) -> str:
    """The routing method a composed model's ``flexmoe.json`` records (or what its history implies):
    the owners' rows as trained ("router"), recalibrated ("calibrated"), or trained on proxy sets."""
    named = meta.get("routing")
    if isinstance(named, dict):
        named = named.get("method")
    # "trained" (the routing methods' name for the rows as trained) is told apart below from the
    # router-trained and calibrated models, which record it too.
    if isinstance(named, str) and named and named != "trained":
        return named
    history = meta.get("history", [])
    if any(e.get("op") == "router-train" for e in history):
        return "router-trained"
    if history and history[-1].get("calibrated"):
        return "calibrated"
    return DEFAULT_ROUTING


def evaluate_composition(setup: CompositionSetup, progress=None) -> dict:
    """Measure and summarise: ``{"composition": block, "perplexity": table, "how": notes}``."""
    ppl, info = composition_perplexities(setup, progress)
    return {
        "composition": composition_metrics(ppl, info["owners"], setup.public, info["routing"]),
        "perplexity": ppl,
        "how": info,
    }
