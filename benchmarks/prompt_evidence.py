"""Which owner each kind of sequence-routing evidence chooses at the end of a chat prompt (the choice a
generation keeps, ``SequenceRouting.prompt_choice``), on a finished ``flexmoe demo --post-train``
workdir: per domain of the chat sets' prompts, how often each expert is chosen (likelihood and rows),
and the mean likelihood evidence per expert. Chose
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
    chosen = {kind: dict.fromkeys([*c.names, "undecided"], 0) for kind in ("likelihood", "rows")}
    total = torch.zeros(len(c.names), dtype=torch.float64)
    for msgs in convs:
        cut = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        ids = torch.tensor([prompt_ids(c.tokenizer, msgs[:cut])])
        for kind, counts in chosen.items():
            c.sequence.prompt_evidence = kind
            with torch.no_grad():
                owners = c.sequence.prompt_choice(decoder, ids)[0, 1:].nonzero().flatten().tolist()
            counts[
                "public" if not owners else c.names[owners[0] + 1] if len(owners) == 1 else "undecided"
            ] += 1
        with torch.no_grad():
            total += c.sequence.margins(decoder, ids, None, evidence="likelihood").double().sum(1)[0]
    mean = [round(float(v), 2) for v in total / len(convs)]
    print(f"{d} prompts: chosen {chosen}; mean likelihood evidence {mean}", flush=True)
