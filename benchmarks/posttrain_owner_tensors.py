"""Test-task accuracy of the merged post-trained model under sequence routing with and without the
owners' own shared tensors, and the oracle (public + the domain's expert) with and without them, on a
finished ``flexmoe demo --post-train`` workdir.

    PYTHONPATH=src python benchmarks/posttrain_owner_tensors.py WORKDIR OUT.json [EVIDENCE]

``EVIDENCE``: ``SequenceRouting.evidence`` (default: the package default).
"""

import json
import sys
from pathlib import Path

from flexmoe.posttrain_demo import evaluate_chat
from flexmoe.runtime import from_pretrained
from flexmoe.sequence_routing import SequenceRouting
from flexmoe.signing import ALLOW_UNSIGNED

W = Path(sys.argv[1])
M = W / "post/models/merged"
C = W / "post/chat"
EV = {"evidence": sys.argv[3]} if len(sys.argv) > 3 else {}
out = {}
for ot in (False, True):
    c = from_pretrained(M, trust=ALLOW_UNSIGNED, sequence_routing=SequenceRouting(owner_tensors=ot, **EV))
    out[f"sequence owner_tensors={ot}"] = {
        d: round(v["accuracy"], 3)
        for d, v in evaluate_chat(c.model, c.tokenizer, C, ("public", "code", "math", "legal"), 24).items()
    }
    print(out, flush=True)
    for d in ("code", "math", "legal"):
        c = from_pretrained(
            M, trust=ALLOW_UNSIGNED, include=[d], sequence_routing=SequenceRouting(owner_tensors=ot, **EV)
        )
        out[f"oracle {d} owner_tensors={ot}"] = round(
            evaluate_chat(c.model, c.tokenizer, C, (d,), 24)[d]["accuracy"], 3
        )
        print(out, flush=True)
json.dump(out, open(sys.argv[2], "w"), indent=1)
