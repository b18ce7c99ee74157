"""Build a demo federation up to the composed model (corpora, anchor, the owners' experts, compose and
opt-out), without the baselines and evaluations of ``flexmoe demo``: the workdir that
``benchmarks/sequence_routing.py`` reads, in a third of the demo's time.

    PYTHONPATH=src python benchmarks/demo_federation.py WORKDIR [--preset small] [--public-mix 0.3] \
        [--shared-rows owner]

Every step is skipped when its output exists, as in the demo (the same functions build it); unlike
the demo it plants no privacy-audit canaries in the owners' data.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from flexmoe.demo import (
    DEMO_PRESETS,
    OWNERS,
    DemoKeys,
    Steps,
    build_demo_corpora,
    compose_and_opt_out,
    demo_preset,
    signed_package,
    train_anchor,
    train_owner,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--preset", default="small", choices=sorted(DEMO_PRESETS))
    ap.add_argument("--public-mix", type=float, help="the owners' share of public sequences (the preset's)")
    ap.add_argument("--shared-rows", help="embedding / LM-head rows the owners train (the preset's)")
    args = ap.parse_args()
    w = args.workdir
    given = {"public_mix": args.public_mix, "shared_rows": args.shared_rows}
    p = demo_preset(args.preset, {k: v for k, v in given.items() if v is not None})
    w.mkdir(parents=True, exist_ok=True)
    steps, t0 = Steps(True), time.perf_counter()
    data, anchor = w / "data", w / "anchor"
    if not data.exists():
        steps.run("corpora", build_demo_corpora, data, size_mb=p.size_mb)
    train_anchor(data, anchor, p, steps, True)
    keys = DemoKeys(w)
    packages = [train_owner(w, data, anchor, d, p, steps, True) for d in OWNERS]
    packages = [signed_package(x, keys.owner(d)) for x, d in zip(packages, OWNERS, strict=True)]
    compose_and_opt_out(w / "models", anchor, packages, steps, keys)
    print(f"built {w} in {time.perf_counter() - t0:.0f} s: {steps.seconds}")


if __name__ == "__main__":
    main()
