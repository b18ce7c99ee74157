"""Shared rows on any federation directory (e.g. the 9-owner measurement federation of
``flexmoe data demo --federation measure``), with an anchor trained on its public pool: each owner's
expert trained with ``--shared-rows MODE``, composed, and scored by the composition metrics (issue 13)
with sequence routing (likelihood evidence; ``--routings``: also without the switch rule) and with the
rows, packages given so that alone:d is what the owner trained and without:d the model re-merged
without it.

    PYTHONPATH=src python benchmarks/federation_shared_rows.py DATA WORK --shared-rows owner \\
        --expert-steps 120 --public-mix 0.6 --split test --json out.json

``WORK/anchor`` is the anchor (``benchmarks/routing_methods.py --workdir WORK`` makes one);
``WORK/owners/D/{data,public}`` each owner's machine (made here when missing, as routing_methods does).
Packages go to ``WORK/owners/D/expert-rows-MODE``, the model to ``WORK/models/rows-MODE``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sequence_routing import split_view  # noqa: E402

from flexmoe.compose import UNSIGNED_OK, compose  # noqa: E402
from flexmoe.demo import device  # noqa: E402
from flexmoe.evaluate.composition import CompositionSetup, evaluate_composition  # noqa: E402
from flexmoe.evaluate.report import composition_markdown  # noqa: E402
from flexmoe.expert.train import ExpertSpec, train_expert  # noqa: E402
from flexmoe.routing_stats import compute_for_package  # noqa: E402
from flexmoe.sequence_routing import SequenceRouting  # noqa: E402
from flexmoe.signing import ALLOW_UNSIGNED  # noqa: E402


def owners_of(data: Path) -> list[str]:
    order = json.loads((data / "manifest.json").read_text())["domain_order"]
    return [d for d in order if d != "public"]


def owner_home(data: Path, work: Path, d: str) -> Path:
    home = work / "owners" / d
    if not (home / "data").exists():  # the owner's machine: its own train/valid and public text
        (home / "data").mkdir(parents=True)
        (home / "public").mkdir(exist_ok=True)
        for split in ("train", "valid"):
            shutil.copy2(data / d / f"{split}.jsonl", home / "data" / f"{split}.jsonl")
        shutil.copy2(data / "public" / "train.jsonl", home / "public" / "train.jsonl")
    return home


def package(data: Path, work: Path, d: str, args) -> Path:
    home = owner_home(data, work, d)
    pkg = home / f"expert-rows-{args.shared_rows}"
    if not pkg.exists():
        t = time.perf_counter()
        train_expert(
            work / "anchor",
            [home / "data"],
            d,
            pkg,
            args.preset,
            spec=ExpertSpec(name=d, router_aux_loss=args.aux),
            steps=args.expert_steps,
            public=[home / "public"],
            public_mix=args.public_mix,
            shared_rows=args.shared_rows,
            quiet=True,
            force=True,
        )
        print(f"trained {d} ({args.shared_rows} rows) in {time.perf_counter() - t:.0f} s", flush=True)
    if not (pkg / "routing_stats.safetensors").exists():
        compute_for_package(work / "anchor", pkg, [home / "data"], [home / "public"])
    return pkg


#: the routings compared: sequence routing at its defaults (likelihood evidence, the switch rule), the
#: same without the switch (the default before the thirteenth session), the rows as trained
ROUTINGS = {"sequence": True, "sequence-no-switch": SequenceRouting(switch=math.inf), "rows": False}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("--shared-rows", default="owner")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--expert-steps", type=int, default=120)
    ap.add_argument("--public-mix", type=float, default=0.6)
    ap.add_argument("--aux", type=float, default=0.1)
    ap.add_argument("--split", default="test", choices=("valid", "test"))
    ap.add_argument("--max-blocks", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--routings", nargs="+", default=["sequence", "rows"], choices=ROUTINGS, help="what to score"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    owners = owners_of(args.data)
    packages = [package(args.data, args.work, d, args) for d in owners]
    model = args.work / "models" / f"rows-{args.shared_rows}"
    if not model.exists():
        compose(args.work / "anchor", packages, model, provenance=UNSIGNED_OK)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        view = split_view(args.data, args.split, Path(tmp), owners)
        for name in args.routings:
            seq = ROUTINGS[name]
            t = time.perf_counter()
            setup = CompositionSetup(
                model, view, owners, anchor=args.work / "anchor", packages=packages,
                max_blocks=args.max_blocks, device=device(), trust=ALLOW_UNSIGNED, sequence_routing=seq,
            )  # fmt: skip
            r = evaluate_composition(setup)
            results[name] = {"composition": r["composition"], "perplexity": r["perplexity"]}
            results[name]["seconds"] = time.perf_counter() - t
            table = "\n".join(composition_markdown(r["composition"])[2:-3])
            print(f"### {name} ({args.split}, {args.shared_rows} rows)\n{table}", flush=True)
            if args.json:
                given = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
                args.json.write_text(json.dumps({"args": given, "results": results}, indent=1))


if __name__ == "__main__":
    main()
