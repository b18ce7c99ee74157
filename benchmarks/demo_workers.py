"""The demo's wall time with its independent trainings and evaluations one after the other (one worker,
two threads) against side by side (``--workers`` processes, each on cpus // workers threads), in one
run on the same host.

Both runs start from the same corpora and anchor (built once, outside the timing: those two steps run
alone either way) and then do the whole demo from there in a fresh workdir of their own: owners'
experts, dense experts, the unrestricted MoE, DP experts, composition, routers, BTX, every evaluation,
the composition blocks and the privacy audit. Reported: wall seconds of each run from the copied anchor
to the written report, their ratio, the seconds of each step (in a worker: the worker's own wall time,
so side-by-side steps sum to more than the wall), and the largest difference between the two reports
(float sums differ in the last bits between one and two threads).

    python benchmarks/demo_workers.py WORKDIR --preset tiny --workers 2 --out demo_workers.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import time
from pathlib import Path

from flexmoe.anchor import pretrain
from flexmoe.corpora import build_demo_corpora
from flexmoe.demo import DemoPreset, demo_preset, run_demo
from flexmoe.jobs import usable_cpus


def _start(root: Path, preset: str, p: DemoPreset) -> Path:
    """The corpora and the anchor once, as the demo builds them (kept when they exist)."""
    base = root / "start"
    if not (base / "anchor").exists():
        build_demo_corpora(base / "data", size_mb=p.size_mb, task_items=p.task_items)
        embedder = "default" if p.router_init == "embed" else None
        pretrain(base / "data" / "public", base / "anchor", p.anchor, steps=p.anchor_steps, embedder=embedder)
    return base


def _run(root: Path, base: Path, preset: str, workers: int) -> dict:
    work = root / f"workers{workers}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copytree(base / "anchor", work / "anchor")
    # Each run plants the privacy section's canaries into its own copy (the anchor never reads owner data).
    shutil.copytree(base / "data", work / "data")
    t = time.perf_counter()
    r = run_demo(work, preset, quiet=True, overrides={"workers": workers})
    return {"wall_seconds": time.perf_counter() - t, "report": r}


def _differences(a: dict, b: dict) -> dict:
    """The largest difference of any model's average (points) and perplexity (relative) between runs."""
    avg = max(abs(x["average"] - b["models"][m]["average"]) for m, x in a["models"].items())
    ppl = max(
        abs(v / b["models"][m]["perplexity"][d] - 1)
        for m, x in a["models"].items()
        for d, v in x["perplexity"].items()
    )
    return {"average_points": avg, "perplexity_relative": ppl}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    p = demo_preset(args.preset)
    base = _start(args.workdir, args.preset, p)
    one = _run(args.workdir, base, args.preset, 1)
    many = _run(args.workdir, base, args.preset, args.workers)
    out = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {usable_cpus()} cpus, {platform.processor() or 'cpu'}",
        "preset": args.preset,
        "workers": args.workers,
        "wall_seconds": {"one_worker": one["wall_seconds"], "side_by_side": many["wall_seconds"]},
        "ratio": many["wall_seconds"] / one["wall_seconds"],
        "largest_difference": _differences(one["report"], many["report"]),
        "step_seconds": {"one_worker": one["report"]["seconds"], "side_by_side": many["report"]["seconds"]},
    }
    print(json.dumps({k: v for k, v in out.items() if k != "step_seconds"}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
