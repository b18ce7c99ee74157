"""Validation-split chat accuracy of a composed post-trained model: the rows, and sequence routing at
several prompt confidences, with (``0``) or without (``0m``) the owners' own shared tensors. The
replies to the chat sets' valid conversations are checked like the tasks (math: the last number; code:
the value after "is"/"to"; otherwise the reference's answer as a word). Used to choose
``SequenceRouting.prompt_confidence`` and ``owner_tensors`` without touching the test tasks.

    PYTHONPATH=src python benchmarks/posttrain_valid_routing.py MODEL CHAT_DIR N 0m 0 2 8
    ONLY=math ...   # only public + math routable (the oracle), math's conversations only
    EVIDENCE=likelihood ...   # SequenceRouting.evidence (default: the package default)
"""

import json
import os
import re
import sys
from pathlib import Path

import torch

from flexmoe.chat import generate, reply_text
from flexmoe.chat_data import correct
from flexmoe.runtime import from_pretrained
from flexmoe.sequence_routing import SequenceRouting
from flexmoe.signing import ALLOW_UNSIGNED

CHECK = {"math": "number", "code": "exact"}


def answer(ref):
    return re.split(r"\b(?:to|is)\s+", ref)[-1].strip().rstrip(".").strip("`'\"")


torch.set_num_threads(2)
model_dir, chat, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
ONLY = os.environ.get("ONLY")
EVIDENCE = {"evidence": os.environ["EVIDENCE"]} if os.environ.get("EVIDENCE") else {}
grid = [None] + [(float(g.rstrip("m")), not g.endswith("m")) for g in sys.argv[4:]]
res = {}
for g in grid:
    c = from_pretrained(
        model_dir,
        trust=ALLOW_UNSIGNED,
        include=[ONLY] if ONLY else None,
        sequence_routing=False
        if g is None
        else SequenceRouting(prompt_confidence=g[0], owner_tensors=g[1], **EVIDENCE),
    )
    print(
        "owner tensors",
        None
        if c.owner_tensors is None
        else {k: {j: len(v.rows) for j, v in d.items()} for k, d in c.owner_tensors.corrections.items()},
        c.owner_tensors and c.owner_tensors.merged_only,
    )
    row = {}
    for d in [ONLY] if ONLY else ("public", *c.names[1:]):
        convs = [json.loads(l)["messages"] for l in open(chat / d / "valid.jsonl")][:n]
        prompts, refs = [], []
        for msgs in convs:
            cut = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            prompts.append(msgs[:cut])
            refs.append(msgs[cut]["content"].strip())
        ok = 0
        for i in range(0, len(prompts), 32):
            outs = generate(c.model, c.tokenizer, prompts[i : i + 32], 32)
            ok += sum(
                correct(reply_text(c.tokenizer, o), answer(r), CHECK.get(d, "contains"))
                for o, r in zip(outs, refs[i : i + 32], strict=True)
            )
        row[d] = round(ok / len(prompts), 3)
    res["rows" if g is None else f"seq@{g[0]}{'' if g[1] else 'm'}"] = row
    print("rows" if g is None else f"seq prompt_conf={g[0]} owner_tensors={g[1]}", row, flush=True)
print(json.dumps(res))
