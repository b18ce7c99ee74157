"""Sequence routing against the rows on a ``benchmarks/routing_methods.py`` workdir (any federation,
e.g. the 9-owner measurement federation), scored per block of 256 tokens exactly as that script scores
its routing methods: composed and each physically removed model (``without_d``, made on first use),
alone/oracle = public + d by mask.

    PYTHONPATH=src python benchmarks/sequence_routing_blocks.py DATA WORK CONF DECAY [EVIDENCE] [--rows]

``WORK/models/aux_trained_keep/all`` is the composed model (routing_methods' "aux/trained[keep]");
``EVIDENCE`` is ``likelihood`` (default) or ``rows``; ``--rows`` also scores the rows as trained.
Results: ``seq_{WORK name}_{EVIDENCE}_{CONF}_{DECAY}.json`` in the current directory.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import routing_methods as RM  # noqa: E402

from flexmoe.anchor import load_anchor  # noqa: E402
from flexmoe.compose import ComposeSettings, remove  # noqa: E402
from flexmoe.moe import Routing, moe_blocks, routing  # noqa: E402
from flexmoe.runtime import from_pretrained  # noqa: E402
from flexmoe.sequence_routing import SequenceRouting  # noqa: E402
from flexmoe.signing import ALLOW_UNSIGNED  # noqa: E402
from flexmoe.tokenizer import load_tokenizer  # noqa: E402

torch.set_num_threads(2)
args = [a for a in sys.argv[1:] if a != "--rows"]
DATA, WORK, CONF, DECAY = Path(args[0]), Path(args[1]), float(args[2]), float(args[3])
EVIDENCE = args[4] if len(args) > 4 else "likelihood"
OWNERS = RM.owners_of(DATA)
DOMAINS = ["public", *OWNERS]
BLOCKS = RM.eval_blocks(DATA, DOMAINS, load_tokenizer(WORK / "anchor"), 256, 32)
MODELS = WORK / "models" / "aux_trained_keep"


@torch.no_grad()
def losses(model, b, mask=None):
    """Mean next-token loss per block, ``mask`` ``[N, E]`` or ``[N, S, E]`` routing each block."""
    out = []
    for s in range(0, len(b), 16):
        with routing(Routing(mask=None if mask is None else mask[s : s + 16])):
            logits = model(b[s : s + 16]).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), b[s : s + 16, 1:], reduction="none")
        out.append(loss.mean(1))
    return torch.cat(out)


def score_model(path, names, sequence: bool):
    if not path.exists():
        remove(MODELS / "all", path.name.removeprefix("without_"), path, ComposeSettings())
    c = from_pretrained(path, trust=ALLOW_UNSIGNED)
    assert c.names[1:] == names, (c.names, names)
    sr = SequenceRouting(confidence=CONF, decay=DECAY, evidence=EVIDENCE)
    sr.head = c.model.get_output_embeddings()
    res = {}
    for key, b in BLOCKS.items():
        mask = (
            torch.cat([sr.mask(c.model, b[s : s + 16]) for s in range(0, len(b), 16)]) if sequence else None
        )
        res[key] = losses(c.model, b, mask)
    return res


def main():
    table = {"anchor": {k: losses(load_anchor(WORK / "anchor").eval(), b) for k, b in BLOCKS.items()}}
    c = from_pretrained(MODELS / "all", trust=ALLOW_UNSIGNED)
    E = moe_blocks(c.model)[0].num_experts
    for d in OWNERS:
        only = torch.zeros(E, dtype=torch.bool)
        only[0] = only[c.names.index(d)] = True
        table[f"alone:{d}"] = {
            k: losses(c.model, b, only.expand(len(b), E)) for k, b in BLOCKS.items() if k[1] == d
        }
    report = {}
    for sequence in (False, True) if "--rows" in sys.argv else (True,):
        t = dict(table)
        t["composed"] = score_model(MODELS / "all", OWNERS, sequence)
        for d in OWNERS:
            t[f"oracle:{d}"] = table[f"alone:{d}"]
            t[f"without:{d}"] = score_model(MODELS / f"without_{d}", [o for o in OWNERS if o != d], sequence)
        name = f"sequence {EVIDENCE} conf={CONF} decay={DECAY}" if sequence else "rows as trained"
        report[name] = {sp: RM.metrics(t, OWNERS, sp) for sp in RM.SPLITS}
        for sp in RM.SPLITS:
            print(sp, RM.row_md(name, report[name][sp], OWNERS), flush=True)
    Path(f"seq_{WORK.name}_{EVIDENCE}_{CONF}_{DECAY}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
