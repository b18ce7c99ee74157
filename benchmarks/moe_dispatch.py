"""How an unfused MoE block with top-k < E runs on the CPU: each expert on the tokens that chose it
(``FlexMoEBlock._sparse``, what the CPU does now) against every expert on every token (``_dense``,
before), in one run.

- Training, the demo's jointly trained baselines through ``flexmoe.evaluate.baselines``: the
  unrestricted MoE (4 experts from the anchor, top-2, everything trainable, all data pooled) and BTX
  (anchor and three dense experts upcycled, top-2, router only). Unfused blocks cannot use the grouped
  matmul: its fused weights are views that no gradient reaches.
- Inference, the BTX model as the demo scores it (unfused, in memory): forward passes of ``--batch`` x
  ``--seq-len`` tokens and single-token calls of ``--batch`` rows (a cached decode step). Composed
  models loaded from disk are fused and keep the grouped matmul (measured there at 0.92x / 1.22x the
  per-expert dispatch's time for these two shapes in this script's first version: no clear winner).

The "before" setups swap the dispatch method in; runs alternate (before, now, before, now, ...) in one
process, so each ratio is measured in the same minutes on the same noisy host. Reported: median wall
seconds per setup and their ratio, the final validation loss of each training run (equal up to float
summation order) and the largest logit difference of the inference paths.

Needs a demo workdir (``flexmoe demo --workdir W`` or ``make demo``'s ``demo-run``)::

    python benchmarks/moe_dispatch.py demo-run --steps 60 --repeats 2 --out moe_dispatch.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from flexmoe.anchor import load_anchor
from flexmoe.demo import OWNERS
from flexmoe.evaluate import baselines as B
from flexmoe.moe import FlexMoEBlock
from flexmoe.tokenizer import load_tokenizer


@contextlib.contextmanager
def before():
    """The CPU's per-expert dispatch replaced by what ran before: every expert on every token."""
    sparse = FlexMoEBlock._sparse
    FlexMoEBlock._sparse = FlexMoEBlock._dense
    try:
        yield
    finally:
        FlexMoEBlock._sparse = sparse


def train_run(kind: str, workdir: Path, steps: int) -> dict:
    tok = load_tokenizer(workdir / "anchor")
    anchor = load_anchor(workdir / "anchor").eval()
    t = B.BaselineTraining(steps=steps, batch_size=8, seq_len=256)
    data = workdir / "data"
    start = time.perf_counter()
    if kind == "unrestricted_moe":
        pools = [data / d for d in ("public", *OWNERS)]
        _, result = B.unrestricted_moe(anchor, tok, pools, experts=4, top_k=2, settings=t)
    else:
        dense = [load_anchor(workdir / "models" / f"dense_{d}").eval() for d in OWNERS]
        _, result = B.btx([anchor, *dense], tok, data / "public", top_k=2, settings=t)
    return {"seconds": time.perf_counter() - start, "final_valid_loss": result.final_valid_loss}


@torch.inference_mode()
def forward_run(model, ids: torch.Tensor, calls: int) -> dict:
    model(input_ids=ids)  # warm-up
    start = time.perf_counter()
    for _ in range(calls):
        logits = model(input_ids=ids).logits
    return {"seconds": (time.perf_counter() - start) / calls, "logits": logits}


def alternate(n: int, setups: dict, summary) -> dict:
    runs = {name: [] for name in setups}
    for _ in range(n):
        for name, fn in setups.items():
            runs[name].append(fn())
            print(f"  {name:28s} {summary(runs[name][-1])}", flush=True)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--steps", type=int, default=60, help="training steps per run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    out = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "steps": a.steps,
        "setups": {},
    }

    def record(name: str, runs: dict, old: str, new: str) -> None:
        med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
        out["setups"][name] = {"median_seconds": med, "now_over_before": med[new] / med[old]}
        print(f"{name}: now / before {med[new] / med[old]:.2f}", flush=True)

    for kind in ("unrestricted_moe", "btx"):

        def old(kind=kind):
            with before():
                return train_run(kind, a.workdir, a.steps)

        runs = alternate(
            a.repeats,
            {
                "before (every expert)": old,
                "now (own tokens)": lambda kind=kind: train_run(kind, a.workdir, a.steps),
            },
            lambda r: f"{r['seconds']:6.1f} s  valid loss {r['final_valid_loss']:.4f}",
        )
        record(f"train {kind}", runs, "before (every expert)", "now (own tokens)")
        out["setups"][f"train {kind}"]["valid_loss"] = {
            k: [r["final_valid_loss"] for r in v] for k, v in runs.items()
        }

    anchor = load_anchor(a.workdir / "anchor").eval()
    dense = [load_anchor(a.workdir / "models" / f"dense_{d}").eval() for d in OWNERS]
    model = B._moe_from([anchor, *dense], top_k=2).eval()
    for shape, calls in (((a.batch, a.seq_len), 10), ((a.batch, 1), 100)):
        ids = torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(0))

        def old(ids=ids, calls=calls):
            with before():
                return forward_run(model, ids, calls)

        runs = alternate(
            a.repeats * 2,
            {
                "before (every expert)": old,
                "now (own tokens)": lambda ids=ids, calls=calls: forward_run(model, ids, calls),
            },
            lambda r: f"{1000 * r['seconds']:7.2f} ms per call",
        )
        name = f"forward {shape[0]}x{shape[1]}"
        record(name, runs, "before (every expert)", "now (own tokens)")
        diff = (
            (runs["now (own tokens)"][-1]["logits"] - runs["before (every expert)"][-1]["logits"]).abs().max()
        )
        out["setups"][name]["max_logit_difference"] = float(diff)
    if a.out:
        a.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
