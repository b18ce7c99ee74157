"""Which owner each kind of sequence-routing evidence names at the end of a chat prompt, on a finished
``flexmoe demo --post-train`` workdir: per domain of the chat sets' prompts, how often each expert has
the most evidence (likelihood and rows), and the mean likelihood evidence per expert. Chose
``SequenceRouting.prompt_evidence`` (valid prompts only).

    PYTHONPATH=src python benchmarks/prompt_evidence.py WORKDIR [N] [SPLIT]
"""

import json
import sys
from pathlib import Path

import torch

from flexmoe.chat import prompt_ids
from flexmoe.runtime import from_pretrained
from flexmoe.sequence_routing import SequenceRouting
from flexmoe.signing import ALLOW_UNSIGNED

torch.set_num_threads(2)
W = Path(sys.argv[1])
N = int(sys.argv[2]) if len(sys.argv) > 2 else 40
SPLIT = sys.argv[3] if len(sys.argv) > 3 else "valid"
c = from_pretrained(W / "post/models/merged", trust=ALLOW_UNSIGNED, sequence_routing=SequenceRouting())
decoder = c.model.get_decoder()
print("experts", c.names)
for d in ("public", *c.names[1:]):
    convs = [json.loads(line)["messages"] for line in open(W / f"post/chat/{d}/{SPLIT}.jsonl")][:N]
    chosen = {"likelihood": [0] * len(c.names), "rows": [0] * len(c.names)}
    total = torch.zeros(len(c.names), dtype=torch.float64)
    for msgs in convs:
        cut = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        ids = torch.tensor([prompt_ids(c.tokenizer, msgs[:cut])])
        for kind in chosen:
            with torch.no_grad():
                e = c.sequence.margins(decoder, ids, None, evidence=kind).double().sum(1)[0]
            total += e if kind == "likelihood" else 0
            chosen[kind][int(e.argmax())] += 1
    mean = [round(float(v), 2) for v in total / len(convs)]
    print(f"{d} prompts: most evidence {chosen}; mean likelihood evidence {mean}", flush=True)
