"""The whole demo (baselines, headline, both composition blocks) with the owners training shared rows
(``DemoPreset.shared_rows``), the privacy section skipped (it does not depend on them and costs a third
of the run); prints the composition blocks and every model's average and perplexities.

    PYTHONPATH=src python benchmarks/demo_shared_rows.py WORKDIR owner [--preset small] [--attention] \
        [--public-mix F] [--expert-steps N] [--owner-steps N] [--dense-domain-only] [--dense-lr LR]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import flexmoe.demo as demo


def _domain_only(dense_jobs):
    """``dense_jobs`` on the domain alone (as before the eleventh session): public mix 0 in the
    recipe they train on and record; the owners and the other baselines keep the preset's mix."""
    return lambda models, anchor, data, p, quiet: dense_jobs(
        models, anchor, data, replace(p, public_mix=0.0), quiet
    )


def _recipe_at(recipe, lr: float):
    """``dense_recipe`` at another learning rate (recorded as such beside the dense experts)."""
    return lambda *a, **k: replace(recipe(*a, **k), lr=lr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("shared_rows", choices=("none", "owner", "all"))
    ap.add_argument("--preset", default="small")
    ap.add_argument("--attention", action="store_true", help="the owners train --shared-attention too")
    ap.add_argument("--public-mix", type=float, help="the owners' public mix (default: the preset's)")
    ap.add_argument("--expert-steps", type=int, help="the owners' and dense experts' steps (the preset's)")
    ap.add_argument("--owner-steps", type=int, help="the owners' steps only (default: --expert-steps)")
    ap.add_argument("--dense-domain-only", action="store_true", help="dense experts without the public mix")
    ap.add_argument("--dense-lr", type=float, help="the dense experts' learning rate (default: the owners')")
    args = ap.parse_args()
    demo.PRIVACY_PRESETS = {}  # read by run_demo at call time
    t = time.time()
    given = {"shared_rows": args.shared_rows, "shared_attention": args.attention}
    given |= {"public_mix": args.public_mix} if args.public_mix else {}
    given |= {"expert_steps": args.expert_steps} if args.expert_steps else {}
    if args.dense_domain_only:
        demo.dense_jobs = _domain_only(demo.dense_jobs)
    if args.dense_lr:
        demo.dense_recipe = _recipe_at(demo.dense_recipe, args.dense_lr)
    if args.owner_steps:  # the owners' experts only: the dense experts keep the preset's steps
        owner, n = demo.owner_job, args.owner_steps
        demo.owner_job = lambda w, d, a, dom, p, q: owner(w, d, a, dom, replace(p, expert_steps=n), q)
    r = demo.run_demo(args.workdir, args.preset, quiet=True, overrides=given)
    print("seconds", round(time.time() - t), json.dumps(r["seconds"]))
    for k in ("composition", "composition_sequence"):
        print(k, json.dumps(r.get(k)))
    for m, v in r["models"].items():
        print(m, v["average"], {d: round(x, 2) for d, x in v["perplexity"].items()}, v["tasks"])


if __name__ == "__main__":
    main()
