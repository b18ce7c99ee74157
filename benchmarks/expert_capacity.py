"""Expert capacity: the held-out (valid) perplexity of one owner's expert alone (anchor + its FFN, composed
from its package) under training variants, beside the anchor fully fine-tuned (``dense``).

    PYTHONPATH=src python benchmarks/expert_capacity.py DEMO_WORKDIR OUT_DIR math tiny \
        '{"base":{"steps":120},"owner":{"steps":120,"shared_rows":"owner"},"dense":{"steps":120}}'

DEMO_WORKDIR is a demo directory (data/, anchor/); a variant is a dict of ``train_expert`` overrides
(``dense``: of ``baselines.dense_expert``). Packages and models are kept in OUT_DIR and reused.
"""

import json
import sys
import time
from pathlib import Path

import torch

from flexmoe import signing
from flexmoe.anchor import load_anchor
from flexmoe.compose import UNSIGNED_OK, compose
from flexmoe.data import load_splits
from flexmoe.evaluate import baselines as B
from flexmoe.evaluate.metrics import HFLM, perplexity
from flexmoe.evaluate.run import load_lm
from flexmoe.expert.train import train_expert
from flexmoe.tokenizer import load_tokenizer

w = Path(sys.argv[1])
out = Path(sys.argv[2])
dom = sys.argv[3]
preset = sys.argv[4]
variants = json.loads(sys.argv[5])  # name -> overrides
blocks = int(sys.argv[6]) if len(sys.argv) > 6 else 32
seq = {"tiny": 256, "small": 512}[preset]
dev = "cuda" if torch.cuda.is_available() else "cpu"
data, anchor = w / "data", w / "anchor"
valid = load_splits([data / dom]).valid
res = {}
for name, ov in variants.items():
    t = time.time()
    if name == "dense":
        tok = load_tokenizer(anchor)
        base = load_anchor(anchor).to(dev)
        m, r = B.dense_expert(base, tok, data / dom, **ov)
        lm = HFLM(m, tok)
    else:
        pkg = out / f"{dom}_{name}"
        if not pkg.exists():
            r = train_expert(
                anchor, [data / dom], dom, pkg, preset, public=[data / "public"], quiet=True, **ov
            )
        mdl = out / f"{dom}_{name}_model"
        if not mdl.exists():
            compose(anchor, [pkg], mdl, provenance=UNSIGNED_OK)
        lm = load_lm(mdl, device=dev, trust=signing.ALLOW_UNSIGNED)
        best = (
            json.loads((pkg / "expert.json").read_text()).get("best_step")
            if (pkg / "expert.json").exists()
            else None
        )
    p = perplexity(lm, valid, seq, max_blocks=blocks)
    res[name] = {
        "ppl": round(p["perplexity"], 3),
        "ci": [round(x, 3) for x in p["ci95"]],
        "s": round(time.time() - t),
        **({"best": best} if name != "dense" else {}),
    }
    print(dom, name, res[name], flush=True)
print(json.dumps(res))
