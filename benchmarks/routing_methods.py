"""Routing methods side by side on one federation: per owner alone gain, retention, opt-out removed,
max other change, oracle retention, and the public change, for every compose-time routing method.

For a federation directory (``flexmoe data demo`` output: ``public/`` and one directory per owner, each
with train/valid/test splits) it trains, once, and caches in ``--workdir``: the anchor, its published
public statistics, and every owner's expert twice (plain, and with the auxiliary "mine vs public"
loss), each with its owner-computed routing statistics. Then, for each configuration, it composes all
owners, removes each owner in turn (recomputing the routing from what remains, as ``flexmoe remove``
does), and scores per-block losses on the valid and the test split of every domain.

Metrics (log = natural log, per domain d, mean next-token loss over the split's packed blocks):
alone gain = L_anchor - L_alone(d) (anchor + d's expert only, as d trained it: bias included);
retention = (L_anchor - L_composed) / alone gain; opt-out removed = (L_without_d - L_composed) /
(L_anchor - L_composed); max other change = max over every other domain e (public included) of
|ppl_e(without d) / ppl_e(composed) - 1|; oracle retention = (L_anchor - L_oracle(d)) / alone gain with
d's text routed by the composed rows over public + d only; public change = ppl_public(composed) /
ppl_public(anchor) - 1. Intervals: 95% percentile bootstrap over test blocks (paired across models).

    PYTHONPATH=src python benchmarks/routing_methods.py --federation DATA --workdir WORK \
        --json routing.json --md routing.md --png routing.png
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SPLITS = ("valid", "test")
MODELS = "models"  # --models-subdir: composed models of another code version must not be reused


@dataclass(frozen=True)
class Config:
    """One routed model: expert variant, routing method, bias mode and how it is evaluated."""

    variant: str = "plain"  # plain | aux
    method: str = "trained"
    bias: str | None = None  # fold | keep (None: the method's default)
    use_bias: bool = False  # evaluate in flexmoe's runtime with the kept biases (else: stock export)
    top_k: int | None = None
    normalize: bool = False
    calibrate: bool = False  # the existing public-row calibration (compose --calibrate)

    @property
    def model_key(self) -> str:
        """The composed directory: evaluation-time choices (runtime bias, top-k) share it."""
        if self.calibrate:
            return f"{self.variant}_public-row-calibrate"
        return f"{self.variant}_{self.method.replace('+', '_').replace('@', '_')}_{self.bias or 'default'}"

    @property
    def name(self) -> str:
        s = f"{self.variant}/{self.method}"
        if self.calibrate:
            s = f"{self.variant}/public-row-calibrate"
        if self.bias:
            s += f"[{self.bias}{'+runtime-bias' if self.use_bias else ''}]"
        if self.top_k is not None or self.normalize:
            s += f" top{self.top_k or 'default'}{' renorm' if self.normalize else ''}"
        return s


def owners_of(data: Path) -> list[str]:
    return sorted(p.name for p in data.iterdir() if p.is_dir() and p.name not in ("public", "tasks"))


# --------------------------------------------------------------------------------------------------
# Training once, cached


def prepare(data: Path, work: Path, args) -> tuple[Path, dict[str, dict[str, Path]]]:
    from flexmoe.anchor import pretrain
    from flexmoe.expert.train import PUBLIC_MIX, ExpertSpec, train_expert
    from flexmoe.routing_stats import ANCHOR_FILE, compute_for_package, publish_anchor_stats

    anchor = work / "anchor"
    if not anchor.exists():
        pretrain(data / "public", anchor, args.preset, steps=args.anchor_steps, quiet=True)
    if not (anchor / ANCHOR_FILE).exists():
        publish_anchor_stats(anchor, [data / "public"])
    packages: dict[str, dict[str, Path]] = {}
    for variant, aux in (("plain", 0.0), ("aux", args.aux)):
        if variant not in args.variants:
            continue
        for d in owners_of(data):
            home = work / "owners" / d
            if not (home / "data").exists():  # the owner's machine: its own train/valid, public text
                (home / "data").mkdir(parents=True)
                (home / "public").mkdir()
                for split in ("train", "valid"):
                    shutil.copy2(data / d / f"{split}.jsonl", home / "data" / f"{split}.jsonl")
                shutil.copy2(data / "public" / "train.jsonl", home / "public" / "train.jsonl")
            pkg = home / f"expert-{variant}"
            if not pkg.exists():
                t = time.perf_counter()
                spec = ExpertSpec(name=d, router_init=args.router_init, router_aux_loss=aux)
                train_expert(
                    anchor,
                    [home / "data"],
                    d,
                    pkg,
                    args.preset,
                    spec=spec,
                    steps=args.expert_steps,
                    public=[home / "public"],
                    public_mix=PUBLIC_MIX if args.public_mix is None else args.public_mix,
                    quiet=True,
                    force=True,  # a cached interrupted run with other settings starts over
                )
                print(f"trained {variant} expert {d} in {time.perf_counter() - t:.0f}s", flush=True)
            if not (pkg / "routing_stats.safetensors").exists():
                compute_for_package(anchor, pkg, [home / "data"], [home / "public"])
            packages.setdefault(variant, {})[d] = pkg
    return anchor, packages


# --------------------------------------------------------------------------------------------------
# Scoring


def eval_blocks(data: Path, domains: list[str], tok, seq_len: int, n: int) -> dict:
    from flexmoe.data import blocks_for, read_documents

    return {
        (split, d): blocks_for(read_documents([data / d / f"{split}.jsonl"]), tok, seq_len)[:n]
        for split in SPLITS
        for d in domains
    }


@torch.no_grad()
def block_losses(model, tok, blocks: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each block ``[n]``."""
    from flexmoe.evaluate.metrics import HFLM

    lm = HFLM(model, tok)
    out = [
        -lm.token_logprobs(blocks[s : s + 16], torch.ones_like(blocks[s : s + 16])).mean(1)
        for s in range(0, len(blocks), 16)
    ]
    return torch.cat(out)


def load(model_dir: Path, cfg: Config, include=None):
    from flexmoe.moe import moe_blocks
    from flexmoe.runtime import from_pretrained
    from flexmoe.signing import ALLOW_UNSIGNED

    # This benchmark's own models, composed unsigned.
    c = from_pretrained(model_dir, include=include, use_bias=cfg.use_bias, trust=ALLOW_UNSIGNED)
    for b in moe_blocks(c.model):
        if cfg.top_k is not None:
            b.top_k = min(cfg.top_k, b.num_experts)
        b.normalize_topk = cfg.normalize
    return c


def score(c, blocks: dict, domains) -> dict:
    return {key: block_losses(c.model, c.tokenizer, b) for key, b in blocks.items() if key[1] in domains}


def run_config(cfg: Config, anchor: Path, packages: dict, work: Path, blocks: dict, domains, owners) -> dict:
    """Losses per (split, domain) for composed, without:d and oracle:d."""
    from flexmoe.compose import UNSIGNED_OK, ComposeSettings, compose, remove
    from flexmoe.router.calibrate import calibrator

    pkgs = [packages[cfg.variant][d] for d in owners]
    mdir = work / MODELS / cfg.model_key
    public = [anchor.parent / "owners" / owners[0] / "public"]
    how = (
        ComposeSettings(calibrate=calibrator(public))
        if cfg.calibrate
        else ComposeSettings(routing=cfg.method, routing_bias=cfg.bias)
    )
    if not (mdir / "all").exists():
        compose(anchor, pkgs, mdir / "all", how, provenance=UNSIGNED_OK)
    out = {"composed": score(load(mdir / "all", cfg), blocks, domains)}
    for d in owners:
        c = load(mdir / "all", cfg, include=[d])
        out[f"oracle:{d}"] = score(c, blocks, [d])
        wd = mdir / f"without_{d}"
        if not wd.exists():
            remove(mdir / "all", d, wd, ComposeSettings(calibrate=how.calibrate))
        out[f"without:{d}"] = score(load(wd, cfg), blocks, domains)
    return out


def metrics(L: dict, owners: list[str], split: str, idx: dict | None = None) -> dict:
    """The issue's composition metrics from per-block losses (``idx``: bootstrap resample per domain)."""

    def m(key, d):
        v = L[key][(split, d)]
        return float(v[idx[d]].mean() if idx else v.mean())

    res = {"owners": {}}
    domains = ["public", *owners]
    for d in owners:
        a, comp = m("anchor", d), m("composed", d)
        gain = a - m(f"alone:{d}", d)
        res["owners"][d] = {
            "alone_gain": gain,
            "retention": (a - comp) / gain if gain else float("nan"),
            "optout_removed": (m(f"without:{d}", d) - comp) / (a - comp) if a != comp else float("nan"),
            "max_other_change": max(
                abs(math.exp(m(f"without:{d}", e) - m("composed", e)) - 1) for e in domains if e != d
            ),
            "oracle_retention": (a - m(f"oracle:{d}", d)) / gain if gain else float("nan"),
            "ppl_alone": math.exp(m(f"alone:{d}", d)),
            "ppl_composed": math.exp(comp),
            "ppl_anchor": math.exp(a),
        }
    res["public_change"] = math.exp(m("composed", "public") - m("anchor", "public")) - 1
    return res


def bootstrap(L: dict, owners, split: str, n: int, seed: int = 0) -> dict:
    """95% percentile intervals of every metric, resampling blocks per domain (paired across models)."""
    g = torch.Generator().manual_seed(seed)
    sizes = {d: len(L["anchor"][(split, d)]) for d in ["public", *owners]}
    draws = []
    for _ in range(n):
        idx = {d: torch.randint(0, k, (k,), generator=g) for d, k in sizes.items()}
        draws.append(metrics(L, owners, split, idx))

    def ci(get):
        vals = sorted(get(x) for x in draws)
        return [vals[int(0.025 * (n - 1))], vals[int(0.975 * (n - 1))]]

    out = {"owners": {}}
    for d in owners:
        out["owners"][d] = {
            k: ci(lambda x, d=d, k=k: x["owners"][d][k])
            for k in ("retention", "optout_removed", "max_other_change", "oracle_retention")
        }
    out["public_change"] = ci(lambda x: x["public_change"])
    return out


# --------------------------------------------------------------------------------------------------


def configs(args) -> list[Config]:
    # In order of priority: a run that is stopped early has the most informative rows.
    cs = [
        Config("plain", "trained", "keep"),
        Config("plain", "lda", "fold"),
        Config("plain", "gated", "fold"),
        Config("plain", "gated@0.3", "fold"),
        Config("plain", "gated", "keep", use_bias=True),
        Config("aux", "gated", "fold"),
        Config("plain", "trained+prior", "fold"),
        Config("plain", "calibrated", "fold"),
        Config("plain", "lda", "keep", use_bias=True),
        Config("plain", "phatgoose"),
        Config("aux", "trained", "keep"),
        Config("aux", "exclusive", "keep"),
        Config("aux", "exclusive@2", "keep"),
        Config("aux", "exclusive@0", "keep"),
        Config("aux", "lda", "fold"),
        Config("plain", "lda+prior", "fold"),
        Config("plain", "trained", "keep", use_bias=True),
        Config("plain", "calibrated", "keep", use_bias=True),
        Config("plain", "trained", calibrate=True),
        Config("aux", "trained", calibrate=True),
        Config("aux", "trained+prior", "fold"),
        Config("aux", "calibrated", "fold"),
        Config("plain", "lda", "keep"),
        Config("plain", "calibrated", "keep"),
    ]
    for k, norm in ((1, False), (2, True), (4, False)):
        cs.append(Config("plain", "lda", "fold", top_k=k, normalize=norm))
        cs.append(Config("plain", "trained", "keep", top_k=k, normalize=norm))
    if args.only:
        cs = [c for c in cs if any(s in c.name for s in args.only)]
    cs = [c for c in cs if c.variant in args.variants]
    return cs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--federation", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--anchor-steps", type=int, default=None)
    ap.add_argument("--expert-steps", type=int, default=60)
    ap.add_argument("--router-init", default="embed")
    ap.add_argument("--aux", type=float, default=0.1)
    ap.add_argument(
        "--public-mix", type=float, default=None, help="share of public sequences (default: flexmoe's)"
    )
    ap.add_argument("--eval-blocks", type=int, default=32)
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--only", nargs="*", help="substrings of configuration names to run")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--variants", nargs="*", default=["plain", "aux"], help="expert variants to use")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    ap.add_argument("--png", type=Path)
    ap.add_argument("--models-subdir", default=MODELS)
    args = ap.parse_args()
    globals()["MODELS"] = args.models_subdir
    torch.set_num_threads(args.threads)
    data, work = args.federation, args.workdir
    owners = owners_of(data)
    domains = ["public", *owners]
    anchor, packages = prepare(data, work, args)
    if args.train_only:
        return
    from flexmoe.anchor import load_anchor
    from flexmoe.tokenizer import load_tokenizer

    tok = load_tokenizer(anchor)
    blocks = eval_blocks(data, domains, tok, 256, args.eval_blocks)
    base = {"anchor": {k: block_losses(load_anchor(anchor).eval(), tok, b) for k, b in blocks.items()}}
    # Alone: d's 2-expert model exactly as d trained it (its learned bias included).
    alone: dict = {}
    results = json.loads(args.json.read_text())["results"] if args.json and args.json.exists() else {}
    for cfg in configs(args):
        if cfg.name in results:  # measured by an earlier, interrupted run of the same command
            continue
        t = time.perf_counter()
        L = dict(base)
        L.update(run_config(cfg, anchor, packages, work, blocks, domains, owners))
        ref = Config(cfg.variant, "trained", "keep", use_bias=True)
        if not (work / MODELS / ref.model_key / "all").exists():
            run_config(ref, anchor, packages, work, {}, [], owners)  # composes only (nothing to score)
        for d in owners:
            key = f"alone:{d}:{cfg.variant}"
            if key not in alone:
                c = load(work / MODELS / ref.model_key / "all", ref, include=[d])
                alone[key] = score(c, blocks, [d])
            L[f"alone:{d}"] = alone[key]
        results[cfg.name] = {
            split: {"metrics": metrics(L, owners, split), "ci95": bootstrap(L, owners, split, args.bootstrap)}
            for split in SPLITS
        }
        results[cfg.name]["seconds"] = time.perf_counter() - t
        print(row_md(cfg.name, results[cfg.name]["test"]["metrics"], owners), flush=True)
        write(args, data, owners, results)


def write(args, data: Path, owners: list[str], results: dict) -> None:
    """The report so far (written after every configuration)."""
    report = {
        "federation": str(data),
        "owners": owners,
        "eval_blocks_per_domain": args.eval_blocks,
        "seq_len": 256,
        "expert_steps": args.expert_steps,
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.md:
        args.md.write_text(markdown(report))
    if args.png:
        plot(report, args.png)


def row_md(name: str, m: dict, owners) -> str:
    cells = []
    for d in owners:
        o = m["owners"][d]
        cells.append(
            f"{o['retention']:.2f} / {o['oracle_retention']:.2f} / {o['optout_removed']:.2f} / "
            f"{100 * o['max_other_change']:.1f}%"
        )
    return f"| {name} | " + " | ".join(cells) + f" | {100 * m['public_change']:+.1f}% |"


def markdown(report: dict) -> str:
    owners = report["owners"]
    lines = []
    for split in SPLITS:
        lines += [
            f"### {split} split ({report['eval_blocks_per_domain']} blocks of {report['seq_len']} tokens "
            "per domain)",
            "",
            "Per owner: retention / oracle retention / opt-out removed / max other change.",
            "",
            "| routing | " + " | ".join(owners) + " | public change |",
            "|---|" + "---:|" * (len(owners) + 1),
        ]
        lines += [row_md(n, r[split]["metrics"], owners) for n, r in report["results"].items()]
        lines.append("")
    first = next(iter(report["results"].values()))["test"]["metrics"]["owners"]
    lines.append(
        "Alone (test): "
        + ", ".join(
            f"{d} ppl {first[d]['ppl_anchor']:.2f} -> {first[d]['ppl_alone']:.2f} "
            f"(gain {first[d]['alone_gain']:.3f} nats)"
            for d in owners
        )
    )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    owners, names = report["owners"], list(report["results"])
    keys = ("retention", "oracle_retention", "optout_removed", "max_other_change")
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 0.35 * len(names) + 2), sharey=True)
    for ax, k in zip(axes, keys, strict=True):
        for j, d in enumerate(owners):
            vals = [report["results"][n]["test"]["metrics"]["owners"][d][k] for n in names]
            ax.scatter(vals, range(len(names)), label=d, marker="o^s*Dv"[j % 6])
        ax.set_title(k)
        if k in ("retention", "oracle_retention"):
            ax.axvline(0.9, color="grey", ls="--")
        elif k == "optout_removed":
            ax.axvspan(0.9, 1.1, color="green", alpha=0.1)
            ax.set_xlim(-1, 3)  # ratios of tiny composed gains run off to +-100: clipped
        else:
            ax.axvline(0.02, color="grey", ls="--")
    axes[0].set_yticks(range(len(names)), names, fontsize=7)
    axes[0].legend()
    fig.suptitle(f"Routing methods (test split): {report['federation']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
