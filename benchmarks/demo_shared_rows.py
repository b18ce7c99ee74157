"""The whole demo (baselines, headline, both composition blocks) with the owners training shared rows
(``DemoPreset.shared_rows``), the privacy section skipped (it does not depend on them and costs a third
of the run); prints the composition blocks and every model's average and perplexities.

    PYTHONPATH=src python benchmarks/demo_shared_rows.py WORKDIR owner [--preset small]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import flexmoe.demo as demo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("shared_rows", choices=("none", "owner", "all"))
    ap.add_argument("--preset", default="small")
    args = ap.parse_args()
    demo.PRIVACY_PRESETS = {}  # read by run_demo at call time
    t = time.time()
    r = demo.run_demo(args.workdir, args.preset, quiet=True, overrides={"shared_rows": args.shared_rows})
    print("seconds", round(time.time() - t), json.dumps(r["seconds"]))
    for k in ("composition", "composition_sequence"):
        print(k, json.dumps(r.get(k)))
    for m, v in r["models"].items():
        print(m, v["average"], {d: round(x, 2) for d, x in v["perplexity"].items()}, v["tasks"])


if __name__ == "__main__":
    main()
