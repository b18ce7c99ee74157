"""Where a sequence-routed chat model sends each domain's prompts, on a ``flexmoe demo --post-train``
workdir, by each prompt evidence: the rows as they are, the rows calibrated on public chat
(``Composed.calibrate_prompts``), and the prompt centroids (``flexmoe.prompt_centroids``, the default
when every owner shipped one); valid conversations (to choose) and test task prompts (to report); then
the test accuracy of the rows' choice (the demo's ``merged_sequence`` uses the default). Chose the
calibrated choice, then the centroids (BENCHMARKS.md, "Calibrated prompt choice", "Prompt centroids").

    PYTHONPATH=src python benchmarks/prompt_calibration.py WORKDIR [--demo] [--preset small] [--out DIR]

``--demo`` first runs (or finishes) ``flexmoe demo --post-train`` in WORKDIR.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from flexmoe.chat import prompt_ids, prompt_turns, read_chat_file
from flexmoe.chat_data import read_tasks
from flexmoe.posttrain_demo import evaluate_chat
from flexmoe.runtime import from_pretrained
from flexmoe.sequence_routing import SequenceRouting
from flexmoe.signing import ALLOW_UNSIGNED

DOMAINS = ("public", "code", "math", "legal")


def prompts(chat: Path, d: str, split: str) -> list[list[dict]]:
    if split == "test":
        return [t["messages"] for t in read_tasks(chat / d / "tasks.jsonl")]
    return [prompt_turns(c) for c in read_chat_file(chat / d / "valid.jsonl")]


@torch.no_grad()
def choices(c, chat: Path, split: str) -> dict:
    """Per domain: how many of its prompts each expert (or public alone) was chosen for."""
    out = {}
    for d in DOMAINS:
        counts: dict[str, int] = {}
        for msgs in prompts(chat, d, split):
            ids = torch.tensor([prompt_ids(c.tokenizer, msgs)], device=c.device)
            owners = c.sequence.prompt_choice(c.model.get_decoder(), ids)[0, 1:].nonzero().flatten().tolist()
            name = "public" if not owners else c.names[owners[0] + 1] if len(owners) == 1 else "undecided"
            counts[name] = counts.get(name, 0) + 1
        out[d] = counts
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--demo", action="store_true")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    w, t0 = args.workdir, time.perf_counter()
    if args.demo:
        cmd = [sys.executable, "-m", "flexmoe", "demo", "--post-train", "--workdir", str(w)]
        subprocess.run([*cmd, "--preset", args.preset], check=True)
    chat, merged = w / "post" / "chat", w / "post" / "models" / "merged"
    res: dict = {}
    for variant in ("rows", "calibrated", "centroids"):
        seq = SequenceRouting(prompt_evidence="rows" if variant != "centroids" else None)
        c = from_pretrained(merged, trust=ALLOW_UNSIGNED, sequence_routing=seq)
        if variant == "calibrated":
            c.calibrate_prompts(read_chat_file(chat / "public" / "train.jsonl"))
            res["prompt_scale"] = c.sequence.prompt_scale.tolist()
        res[f"{variant}/evidence"] = c.sequence.prompt_evidence
        for split in ("valid", "test"):
            res[f"{variant}/{split}"] = choices(c, chat, split)
            print(variant, split, res[f"{variant}/{split}"], f"{time.perf_counter() - t0:.0f} s", flush=True)
    rows_only = SequenceRouting(prompt_evidence="rows")
    rows = from_pretrained(merged, trust=ALLOW_UNSIGNED, sequence_routing=rows_only)
    acc = evaluate_chat(rows.model, rows.tokenizer, chat, DOMAINS, 24)
    res["rows_accuracy"] = {d: v["accuracy"] for d, v in acc.items()}
    print("rows' choice, test accuracy", res["rows_accuracy"], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prompt_choices.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
