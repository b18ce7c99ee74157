"""Sequence routing with evidence from owner-shipped statistics instead of the rows' margins, on a
``benchmarks/routing_methods.py`` workdir (its ``aux`` experts with routing statistics and its
``aux_trained_keep`` composed models). Prints the composition metrics (valid and test) and, per domain,
which owner the positions went to.

    PYTHONPATH=src python benchmarks/sequence_evidence.py DATA WORKDIR MODE CONF DECAY [all|first:K] \
        [--json OUT]

Modes: rows (current), lda (LDA log-likelihood ratio vs public, from mean_own + anchor cov),
gauss (per-owner Gaussian LLR of the row margin from margin_own/margin_public stats), zrows (row margin
standardised by its public std).  args: DATA WORK MODE CONF DECAY [LAYERS: all|first:K]"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import routing_methods as RM

from flexmoe.anchor import load_anchor
from flexmoe.moe import Routing, moe_blocks, routing
from flexmoe.routing_stats import load_anchor_stats, load_owner_stats, regularised
from flexmoe.runtime import from_pretrained
from flexmoe.sequence_routing import SequenceRouting
from flexmoe.signing import ALLOW_UNSIGNED
from flexmoe.tokenizer import load_tokenizer

torch.set_num_threads(2)
data, work, MODE = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
CONF, DECAY = float(sys.argv[4]), float(sys.argv[5])
LAYERS = sys.argv[6] if len(sys.argv) > 6 and not sys.argv[6].startswith("--") else "all"
owners = RM.owners_of(data)
domains = ["public", *owners]
anchor = work / "anchor"
tok = load_tokenizer(anchor)
blocks = RM.eval_blocks(data, domains, tok, 256, 32)
mdir = work / "models" / "aux_trained_keep"
ostats = {d: load_owner_stats(work / "owners" / d / "expert-aux") for d in owners}
astats = load_anchor_stats(anchor)


def lda_params(names, L):
    out = []
    for l in range(L):
        cov = regularised(astats[f"layers.{l}.cov"].double())
        means = torch.stack(
            [astats[f"layers.{l}.mean"].double()]
            + [ostats[n][f"layers.{l}.mean_own"].double() for n in names]
        )
        w = torch.linalg.solve(cov, means.T).T
        c = -0.5 * (w * means).sum(1)
        out.append(((w - w[:1]).float(), (c - c[:1]).float()))
    return out


class Seq(SequenceRouting):
    names: list = None

    def margins(self, model, input_ids, attention_mask):
        L = len(moe_blocks(model))
        use = range(L) if LAYERS == "all" else range(int(LAYERS.split(":")[1]))
        params = lda_params(self.names, L) if MODE == "lda" else None

        def stat(i: int, key: str, k: int, first: float) -> torch.Tensor:
            return torch.tensor([first] + [float(ostats[n][f"layers.{i}.{key}"][k]) for n in self.names])

        def evidence(i, block, h):
            if i not in use:
                return None
            h = h.float()
            if MODE == "lda":
                w, c = params[i]
                return h @ w.T + c
            lg = block.router_logits(h).float()
            m = lg - lg[..., :1]
            if MODE == "rows":
                return m
            mo, so = stat(i, "margin_own", 0, 0.0), stat(i, "margin_own", 1, 1.0)
            mp, sp = stat(i, "margin_public", 0, 0.0), stat(i, "margin_public", 1, 1.0)
            if MODE == "zrows":
                z = (m - mp) / sp
            else:  # gauss: log-likelihood ratio own vs public of the margin
                z = (
                    (-0.5 * ((m - mo) / so) ** 2 - so.log()) - (-0.5 * ((m - mp) / sp) ** 2 - sp.log())
                ).clamp(-20, 20)
            z[..., 0] = 0
            return z

        return torch.stack(self.anchor_pass(model, input_ids, attention_mask, evidence)).mean(0)


@torch.no_grad()
def losses(model, b, mask=None):
    out = []
    for s in range(0, len(b), 16):
        x = b[s : s + 16]
        m = None if mask is None else mask[s : s + 16]
        with routing(Routing(mask=m)):
            logits = model(x).logits[:, :-1].float()
        out.append(
            torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").mean(1)
        )
    return torch.cat(out)


def seq_mask(model, names, b):
    sr = Seq(confidence=CONF, decay=DECAY)
    sr.names = names
    return torch.cat([sr.mask(model, b[s : s + 16]) for s in range(0, len(b), 16)])


share = {}


def score_model(path, names, doms):
    if not path.exists():
        from flexmoe.compose import ComposeSettings, remove

        remove(mdir / "all", path.name.removeprefix("without_"), path, ComposeSettings())
    c = from_pretrained(path, trust=ALLOW_UNSIGNED)
    assert c.names[1:] == names, (c.names, names)
    res = {}
    for key, b in blocks.items():
        if key[1] not in doms:
            continue
        mk = seq_mask(c.model, names, b)
        if path.name == "all":  # which owner was chosen (share of positions, owner-only masks)
            single = mk[..., 1:].sum(-1) == 1
            share[f"{key[0]}:{key[1]}"] = {
                n: round(float((mk[..., j + 1] & single).float().mean()), 3) for j, n in enumerate(names)
            } | {
                "undecided": round(float((mk[..., 1:].sum(-1) > 1).float().mean()), 3),
                "public": round(float((mk[..., 1:].sum(-1) == 0).float().mean()), 3),
            }
        res[key] = losses(c.model, b, mk)
    return res


L = {"anchor": {k: losses(load_anchor(anchor).eval(), b) for k, b in blocks.items()}}
for d in owners:
    c = from_pretrained(mdir / "all", trust=ALLOW_UNSIGNED)
    E = moe_blocks(c.model)[0].num_experts
    only = torch.zeros(E, dtype=torch.bool)
    only[0] = True
    only[c.names.index(d)] = True
    L[f"alone:{d}"] = {k: losses(c.model, b, only.expand(len(b), E)) for k, b in blocks.items() if k[1] == d}
L["composed"] = score_model(mdir / "all", owners, domains)
for d in owners:
    L[f"oracle:{d}"] = L[f"alone:{d}"]
    L[f"without:{d}"] = score_model(mdir / f"without_{d}", [o for o in owners if o != d], domains)
name = f"{MODE} {LAYERS} conf={CONF} decay={DECAY}"
report = {sp: RM.metrics(L, owners, sp) for sp in RM.SPLITS}
for sp in RM.SPLITS:
    print(sp, RM.row_md(name, report[sp], owners), flush=True)
for k, v in share.items():
    print(k, v)
if "--json" in sys.argv:
    json.dump({"report": report, "share": share}, open(sys.argv[sys.argv.index("--json") + 1], "w"), indent=1)
