"""Build a demo federation up to the composed model (corpora, anchor, the owners' experts, compose and
opt-out), without the baselines and evaluations of ``flexmoe demo``: the workdir that
``benchmarks/sequence_routing.py`` reads, in a third of the demo's time.

    PYTHONPATH=src python benchmarks/demo_federation.py WORKDIR [--preset small] [--public-mix 0.3]

Every step is skipped when its output exists, as in the demo (the same functions build it); unlike
the demo it plants no privacy-audit canaries in the owners' data.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from flexmoe.demo import (
    DEMO_PRESETS,
    OWNERS,
    DemoKeys,
    Steps,
    build_demo_corpora,
    compose_and_opt_out,
    default_embedder,
    pretrain,
    signed_package,
    train_owner,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--preset", default="small", choices=sorted(DEMO_PRESETS))
    ap.add_argument("--public-mix", type=float, help="the owners' share of public sequences (the preset's)")
    args = ap.parse_args()
    w, p = args.workdir, DEMO_PRESETS[args.preset]
    if args.public_mix is not None:
        p = replace(p, public_mix=args.public_mix)
    if p.router_init == "embed" and default_embedder() is None:  # as the demo does
        p = replace(p, router_init="hidden")
    w.mkdir(parents=True, exist_ok=True)
    steps, t0 = Steps(True), time.perf_counter()
    data, anchor = w / "data", w / "anchor"
    if not data.exists():
        steps.run("corpora", build_demo_corpora, data, size_mb=p.size_mb)
    if not anchor.exists():
        embedder = "default" if p.router_init == "embed" else None
        steps.run(
            "anchor",
            pretrain,
            data / "public",
            anchor,
            p.anchor,
            steps=p.anchor_steps,
            quiet=True,
            embedder=embedder,
        )
    keys = DemoKeys(w)
    packages = [train_owner(w, data, anchor, d, p, steps, True) for d in OWNERS]
    packages = [signed_package(x, keys.owner(d)) for x, d in zip(packages, OWNERS, strict=True)]
    compose_and_opt_out(w / "models", anchor, packages, steps, keys)
    print(f"built {w} in {time.perf_counter() - t0:.0f} s: {steps.seconds}")


if __name__ == "__main__":
    main()
