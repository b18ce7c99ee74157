"""Which parameters carry a domain: the anchor fine-tuned on one domain with only some parameter groups
trainable (regular expressions over parameter names, each with its learning rate); valid perplexity.

    PYTHONPATH=src python benchmarks/expert_param_groups.py DEMO_WORKDIR math 120 \
        '{"all":[".",1e-3],"mlp":["mlp",1e-3],"emb_head":["embed_tokens|lm_head",1e-3]}'
"""

import copy
import json
import re
import sys
import time
from pathlib import Path

import torch

from flexmoe.anchor import load_anchor
from flexmoe.data import blocks_for, load_splits
from flexmoe.evaluate.baselines import BaselineTraining, _cfg
from flexmoe.evaluate.metrics import HFLM, perplexity
from flexmoe.tokenizer import load_tokenizer
from flexmoe.training import PackedBlocks, RunOptions, Stage, train

w = Path(sys.argv[1])
dom = sys.argv[2]
steps = int(sys.argv[3])
groups = json.loads(sys.argv[4])
bs, seq = (8, 256) if len(sys.argv) < 6 else map(int, sys.argv[5].split("x"))
dev = "cuda" if torch.cuda.is_available() else "cpu"
data, anchor = w / "data", w / "anchor"
tok = load_tokenizer(anchor)
base = load_anchor(anchor).to(dev)
splits = load_splits([data / dom])
stage_blocks = blocks_for(splits.train, tok, seq), blocks_for(splits.valid, tok, seq)
for name, (pat, lr) in groups.items():
    t = time.time()
    m = copy.deepcopy(base).train()
    n = 0
    for k, p in m.named_parameters():
        p.requires_grad_(bool(re.search(pat, k)))
        n += p.numel() if p.requires_grad else 0
    st = Stage(PackedBlocks(stage_blocks[0]), stage_blocks[1], desc=name)
    train(
        m,
        _cfg(BaselineTraining(steps=steps, batch_size=bs, seq_len=seq, lr=lr), 1e-3),
        st,
        RunOptions(quiet=True),
    )
    p = perplexity(HFLM(m.eval(), tok), splits.valid, seq, max_blocks=32)
    print(
        dom,
        name,
        n,
        round(p["perplexity"], 3),
        [round(x, 2) for x in p["ci95"]],
        round(time.time() - t),
        flush=True,
    )
