"""Print (and optionally save) how much each owner of a built federation overlaps its public pool.

Usage: ``python scripts/corpus_overlap.py DIR [--json OUT.json]`` where DIR was written by
``flexmoe data demo --out DIR [--federation measure]``. The columns are defined in
``flexmoe.corpora.overlap``; DATA.md quotes the output for both federations.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flexmoe.corpora.overlap import markdown, overlap_report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON here")
    args = ap.parse_args()
    report = overlap_report(args.data)
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
