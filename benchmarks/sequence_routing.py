"""Sequence routing against the rows, on a demo workdir's composed model: the composition metrics
(issue 13) for the rows as trained and for a grid of sequence-routing settings, on the valid split
(to choose a default) or the test split (to report it).

    PYTHONPATH=src python benchmarks/sequence_routing.py --workdir demo-run --split valid \\
        --grid 2:1.0 8:1.0 8:0.95 --json seq_valid.json

``--workdir`` is a finished ``flexmoe demo`` directory (data/, anchor/, models/flexolmo, owners/*/expert).
A grid entry is ``CONFIDENCE:DECAY[:EVIDENCE[:SWITCH]]`` (evidence rows by default; SWITCH: follow a
change of domain, ``SequenceRouting.switch``; empty: the evidence's default; ``inf``: off). The valid
split is presented to the evaluation as each domain's test split through a temporary directory of
links, so the same function measures both.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from flexmoe.demo import OWNERS, device
from flexmoe.evaluate.composition import CompositionSetup, evaluate_composition
from flexmoe.evaluate.report import composition_markdown
from flexmoe.sequence_routing import SequenceRouting
from flexmoe.signing import ALLOW_UNSIGNED


def split_view(data: Path, split: str, tmp: Path, owners=OWNERS) -> Path:
    """A data directory whose test splits are ``split`` (links, nothing copied)."""
    if split == "test":
        return data
    for d in ("public", *owners):
        (tmp / d).mkdir(parents=True)
        (tmp / d / "test.jsonl").symlink_to((data / d / f"{split}.jsonl").resolve())
    return tmp


def grid_entry(g: str) -> tuple[str, SequenceRouting]:
    """``CONFIDENCE:DECAY[:EVIDENCE[:SWITCH]]`` (evidence default rows; switch default the evidence's)."""
    parts = g.split(":")
    c, dc = parts[:2]
    ev, sw = (parts[2] if len(parts) > 2 else "rows"), (parts[3] if len(parts) > 3 else "")
    seq = SequenceRouting(confidence=float(c), decay=float(dc), evidence=ev, switch=float(sw) if sw else None)
    return f"sequence {ev} conf={c} decay={dc}" + (f" switch={sw}" if sw else ""), seq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--split", default="valid", choices=("valid", "test"))
    ap.add_argument("--grid", nargs="*", default=["0:1.0"], help="CONFIDENCE:DECAY[:EVIDENCE[:SWITCH]]")
    ap.add_argument("--max-blocks", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(2)
    w = args.workdir
    packages = [w / "owners" / d / "expert" for d in OWNERS]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = split_view(w / "data", args.split, Path(tmp))
        runs = [("rows", False)] + [grid_entry(g) for g in args.grid]
        for name, seq in runs:
            t = time.perf_counter()
            setup = CompositionSetup(
                w / "models" / "flexolmo",
                data,
                OWNERS,
                anchor=w / "anchor",
                packages=packages,
                seq_len=args.seq_len,
                max_blocks=args.max_blocks,
                device=device(),
                trust=ALLOW_UNSIGNED,  # the benchmark reads the demo's own model
                sequence_routing=seq,
            )
            r = evaluate_composition(setup)
            results[name] = {"composition": r["composition"], "perplexity": r["perplexity"]}
            results[name]["seconds"] = time.perf_counter() - t
            print(
                f"### {name} ({args.split})\n" + "\n".join(composition_markdown(r["composition"])[2:-3]),
                flush=True,
            )
            if args.json:
                args.json.write_text(json.dumps({"split": args.split, "results": results}, indent=1))


if __name__ == "__main__":
    main()
