"""Router training on proxy sets vs data-free calibration vs plain FlexOlmo, on the tiny demo.

For every set of owners (each pair, all three) the script composes the owners' experts three ways:
plain (``compose``), calibrated (``compose --calibrate``, public text only) and router-trained
(``router train`` on the present owners' proxy sets + public text); then it removes one owner
(``legal``) from each of the three-owner models: plain ``remove``, ``remove --calibrate``, and
``remove`` from the router-trained model (the remaining trained rows are kept, as the paper does).
Every model is evaluated exactly as the demo evaluates (test-split perplexity per domain and the five
tasks), and the public expert's share of the routing weight on public text is recorded.

The demo's inputs (corpora, anchor, the owners' experts and proxy sets) are taken from ``--workdir``
and built there with the demo's own functions when missing, so running this after ``make demo``
measures exactly the demo's experts.

Usage::

    python benchmarks/router_calibration.py --workdir demo-run --json router.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from pathlib import Path

import torch


def ensure_inputs(workdir: Path, preset: str) -> tuple[Path, Path, dict, dict]:
    """Corpora, anchor, experts and proxy sets, built with the demo's steps where missing."""
    from dataclasses import replace

    from flexmoe.anchor import default_embedder, pretrain
    from flexmoe.corpora import build_demo_corpora
    from flexmoe.demo import DEMO_PRESETS, OWNERS, Steps, select_owner_proxy, train_owner

    p = DEMO_PRESETS[preset]
    if p.router_init == "embed" and default_embedder() is None:
        p = replace(p, router_init="hidden")
    data, anchor, steps = workdir / "data", workdir / "anchor", Steps(quiet=False)
    if not data.exists():
        build_demo_corpora(data, size_mb=p.size_mb)
    if not anchor.exists():
        embedder = "default" if p.router_init == "embed" else None
        pretrain(data / "public", anchor, p.anchor, steps=p.anchor_steps, quiet=True, embedder=embedder)
    packages = {d: train_owner(workdir, data, anchor, d, p, steps, True) for d in OWNERS}
    proxies = {d: select_owner_proxy(workdir, d, p, steps, True) for d in OWNERS}
    return data, anchor, packages, proxies


@torch.no_grad()
def anchor_share_on_public(model: Path, data: Path, seq_len: int, n_blocks: int = 16) -> float:
    """The public expert's share of the routing weight over public test text (all layers)."""
    from flexmoe.data import blocks_for, read_documents
    from flexmoe.moe import routing
    from flexmoe.runtime import from_pretrained
    from flexmoe.signing import ALLOW_UNSIGNED

    c = from_pretrained(model, trust=ALLOW_UNSIGNED)  # this benchmark's own models, unsigned
    x = blocks_for(read_documents([data / "public" / "test.jsonl"]), c.tokenizer, seq_len)[:n_blocks]
    total, pub = 0.0, 0.0
    for s in range(0, len(x), 8):
        with routing(c.routing(record=True)) as r:
            c.model(input_ids=x[s : s + 8])
        w = r.weights.reshape(-1, len(c.names))  # summed over layers, as the per-layer sums were
        total, pub = total + float(w.sum()), pub + float(w[:, 0].sum())
    return pub / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("demo-run"))
    ap.add_argument(
        "--out", type=Path, default=None, help="where the models go (default WORKDIR/router-bench)"
    )
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--removed", default="legal")
    args = ap.parse_args()

    from flexmoe.compose import UNSIGNED_OK, ComposeSettings, compose, remove
    from flexmoe.demo import DEMO_PRESETS, OWNERS
    from flexmoe.evaluate.run import EvalSettings, evaluate_lm, load_lm
    from flexmoe.expert.train import EXPERT_PRESETS
    from flexmoe.router.calibrate import calibrator
    from flexmoe.router.train import train_router
    from flexmoe.signing import ALLOW_UNSIGNED

    torch.set_num_threads(min(2, torch.get_num_threads()))
    p = DEMO_PRESETS[args.preset]
    seq_len = EXPERT_PRESETS[p.expert].seq_len
    data, anchor, packages, proxies = ensure_inputs(args.workdir, args.preset)
    out = args.out or args.workdir / "router-bench"
    out.mkdir(parents=True, exist_ok=True)
    public = [data / "public"]
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}

    def timed(key: str, fn, *a, **kw):
        t = time.perf_counter()
        r = fn(*a, **kw)
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t
        return r

    models: dict[str, Path] = {}
    sets = [c for k in (2, len(OWNERS)) for c in itertools.combinations(OWNERS, k)]
    for owners in sets:
        tag = "+".join(owners)
        plain, cal, rt = out / f"{tag}-plain", out / f"{tag}-calibrated", out / f"{tag}-rt"
        pk = [packages[d] for d in owners]
        if not plain.exists():
            timed("compose", compose, anchor, pk, plain, provenance=UNSIGNED_OK)
        if not cal.exists():
            timed(
                "compose --calibrate",
                compose,
                anchor,
                pk,
                cal,
                ComposeSettings(calibrate=calibrator(public)),
                provenance=UNSIGNED_OK,
            )
        if not rt.exists():
            timed(
                "router train",
                train_router,
                plain,
                [proxies[d] for d in owners],
                public,
                rt,
                steps=p.rt_steps,
            )
        models.update({f"{tag} plain": plain, f"{tag} calibrated": cal, f"{tag} rt": rt})
    full = "+".join(OWNERS)
    tag = f"{full}-without-{args.removed}"
    calibrated = ComposeSettings(calibrate=calibrator(public))
    for kind, how in (("plain", None), ("calibrated", calibrated), ("rt", None)):
        dst = out / f"{tag}-{kind}"
        if not dst.exists():
            timed(f"remove ({kind})", remove, out / f"{full}-{kind}", args.removed, dst, how)
        models[f"{full} - {args.removed} {kind}"] = dst

    results = {}
    for name, path in models.items():
        r = timed(
            "evaluate",
            evaluate_lm,
            load_lm(path, trust=ALLOW_UNSIGNED),  # this benchmark's own models, unsigned
            data,
            EvalSettings(seq_len=seq_len, max_blocks=p.eval_blocks, max_items=p.eval_items),
        )
        r.pop("details", None)
        r["anchor_share_on_public"] = anchor_share_on_public(path, data, seq_len)
        results[name] = r
        print(
            f"{name:36s} avg {r['average']:5.1f}  "
            + " ".join(f"{d} {v:8.2f}" for d, v in r["perplexity"].items())
            + f"  anchor share {r['anchor_share_on_public']:.2f}",
            flush=True,
        )

    rows = []
    groups = ["+".join(o) for o in sets] + [f"{full} - {args.removed}"]
    for g in groups:
        base = results[f"{g} plain"]
        row = {"owners": g}
        for kind in ("plain", "calibrated", "rt"):
            r = results[f"{g} {kind}"]
            row[kind] = {
                "average": r["average"],
                "perplexity": r["perplexity"],
                "ppl_change_percent": {
                    d: 100 * (r["perplexity"][d] / base["perplexity"][d] - 1) for d in base["perplexity"]
                },
                "anchor_share_on_public": r["anchor_share_on_public"],
            }
        rows.append(row)
    gain = {
        k: sum(r[k]["average"] - r["plain"]["average"] for r in rows) / len(rows)
        for k in ("calibrated", "rt")
    }
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "preset": args.preset,
        "rt_steps": p.rt_steps,
        "rows": rows,
        "mean_average_gain": gain,
        "seconds": seconds,
        "total_seconds": time.perf_counter() - t_start,
    }
    print(
        "\n| owners | model | average | "
        + " | ".join(f"ppl {d}" for d in ("public", *OWNERS))
        + " | anchor share (public text) |"
    )
    print("|---|---|---:|" + "---:|" * (len(OWNERS) + 2))
    for r in rows:
        for kind in ("plain", "calibrated", "rt"):
            x = r[kind]
            cells = [
                f"{x['perplexity'][d]:.2f}"
                + (f" ({x['ppl_change_percent'][d]:+.0f}%)" if kind != "plain" else "")
                for d in ("public", *OWNERS)
            ]
            print(
                f"| {r['owners']} | {kind} | {x['average']:.1f} | "
                + " | ".join(cells)
                + f" | {x['anchor_share_on_public']:.2f} |"
            )
    print(
        f"\nmean gain in average over plain: calibrated {gain['calibrated']:+.2f}, "
        f"rt {gain['rt']:+.2f} points"
    )
    print(
        "seconds: "
        + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
        + f"; total {report['total_seconds']:.0f}"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
