"""Documents that cross owners: how each way of combining the owners scores text whose domain changes
in the middle (a licence header and then code, worked maths and then legal prose).

The demo's tasks are one domain each, the case where BTM's and sequence routing's one choice per text
is ideal. Here every block is the first half of one domain's held-out stream followed by the first
half of another's (ordered pairs of public and the owners), and the second half (after the switch) is
scored separately: a method that commits to the first domain pays there. The reference is the dense
model of the second half's owner given the same block.

    PYTHONPATH=src python benchmarks/mixed_documents.py WORKDIR [--split valid|test] [--blocks N] \
        [--decay D[:C] ...] [--switch S ...] [--out results.json]

WORKDIR is a finished ``flexmoe demo`` run (its data, anchor, dense experts and composed model).
``--decay`` adds sequence-routing variants whose evidence forgets older positions (likelihood
evidence; optionally with another confidence C, in nats), and BTM with the same forgetting; choose
among them on ``--split valid``, report ``test`` (no switch: forgetting is the other way to follow a
change). ``flexolmo_sequence`` is the runtime's default, which follows a change of domain once the
recent positions' owner leads by 1 nat (``SequenceRouting.switch``); ``--switch`` adds other margins
(``inf``: off, the default before the thirteenth session).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import torch

from flexmoe.data import pack, read_documents, tokenize
from flexmoe.evaluate import baselines as B
from flexmoe.evaluate.metrics import HFLM, bootstrap_ppl
from flexmoe.evaluate.run import load_lm, seq_len_of
from flexmoe.sequence_routing import SequenceRouting, evidence
from flexmoe.signing import Trust

DOMAINS = ("public", "code", "math", "legal")


def mixed_blocks(data: Path, tok, seq_len: int, split: str, n: int) -> dict[tuple[str, str], torch.Tensor]:
    """``[n, seq_len]`` blocks per ordered pair (a, b): a's held-out stream, then b's, half each."""
    half = seq_len // 2
    chunks = {d: pack(tokenize(read_documents([data / d / f"{split}.jsonl"]), tok), half) for d in DOMAINS}
    out = {}
    for a, b in itertools.permutations(DOMAINS, 2):
        k = min(n, len(chunks[a]), len(chunks[b]))
        out[(a, b)] = torch.cat([chunks[a][:k], chunks[b][:k]], dim=1)
    return out


class DecayedBTM(B.BTMLM):
    """BTM whose weights forget older tokens by ``decay`` per position, as sequence routing's evidence
    does with a decay (the same rule, so that the comparison stays like for like)."""

    def __init__(self, lms, decay: float, **kw):
        super().__init__(lms, **kw)
        self.decay = decay

    @torch.no_grad()
    def _weights(self, tok_lp, mask, prefix_len):
        if prefix_len is not None or self.decay >= 1.0:
            return super()._weights(tok_lp, mask, prefix_len)
        # the decayed mean NLL of the tokens before each prediction: sequence routing's decayed sum
        # (``evidence``, [B, T, models]) of the NLLs over that of the token counts, shifted by one
        valid = mask[:, 1:]
        num = evidence(-tok_lp.permute(1, 2, 0), valid, self.decay)
        den = evidence(torch.ones_like(num[..., :1]), valid, self.decay)
        mean = torch.where(den > 0, num / den.clamp_min(1e-9), torch.zeros_like(num))
        mean = torch.cat([torch.zeros_like(mean[:, :1]), mean[:, :-1]], dim=1)
        return self.top_weights(mean.permute(2, 0, 1).to(tok_lp.dtype))


def composed(model: Path, trust: Trust, sequence: SequenceRouting | None) -> HFLM:
    return load_lm(model, trust=trust, sequence_routing=sequence or False)


def score(lm, blocks: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Per-block NLL sums of the first and the second half: ``[n, 2]``."""
    half = blocks.shape[1] // 2
    out = []
    for s in range(0, len(blocks), batch):
        b = blocks[s : s + batch]
        nll = -lm.token_logprobs(b, torch.ones_like(b)).double()  # [n, T-1]: predicts tokens 1..T-1
        out.append(torch.stack([nll[:, : half - 1].sum(1), nll[:, half - 1 :].sum(1)], 1))
    return torch.cat(out)


def ppl_ci(nll: torch.Tensor, tokens: int) -> dict:
    """Perplexity of a half over blocks (``nll``: per-block sums), with the 95% bootstrap interval over
    blocks that test-split perplexities use (``metrics.bootstrap_ppl``)."""
    ci = bootstrap_ppl(nll, torch.full_like(nll, tokens))
    return {"ppl": math.exp(float(nll.mean()) / tokens), "ci95": ci}


def variants(w: Path, anchor, dense: dict, trust: Trust, decays: list[str], switches: list[float]) -> dict:
    """The models to compare, each built when its turn comes."""
    lms = {
        "public": lambda: anchor,
        "btm": lambda: B.BTMLM([anchor, *dense.values()]),
        "flexolmo (rows)": lambda: composed(w / "models" / "flexolmo", trust, None),
        "flexolmo_sequence": lambda: composed(w / "models" / "flexolmo", trust, SequenceRouting()),
    }
    for entry in decays:  # DECAY or DECAY:CONFIDENCE
        dk, conf = (float(x) for x in (entry.split(":") + ["0.5"])[:2])
        lms[f"btm decay {dk}"] = lambda dk=dk: DecayedBTM([anchor, *dense.values()], dk)
        lms[f"flexolmo_sequence decay {dk} conf {conf}"] = lambda dk=dk, conf=conf: composed(
            w / "models" / "flexolmo", trust, SequenceRouting(decay=dk, confidence=conf, switch=math.inf)
        )
    for sw in switches:
        lms[f"flexolmo_sequence switch {sw}"] = lambda sw=sw: composed(
            w / "models" / "flexolmo", trust, SequenceRouting(switch=sw)
        )
    return lms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--split", default="test", choices=("valid", "test"))
    ap.add_argument("--blocks", type=int, default=24, help="blocks per ordered pair of domains")
    ap.add_argument("--decay", nargs="*", default=[], help="extra DECAY[:CONFIDENCE] variants to compare")
    ap.add_argument("--switch", type=float, nargs="*", default=[], help="sequence-routing switch margins")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    w = args.workdir
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    trust = Trust.from_paths([w / "keys" / "maintainer.pub"])
    anchor = load_lm(w / "anchor", device=dev)
    dense = {d: load_lm(w / "models" / f"dense_{d}", device=dev) for d in DOMAINS[1:]}
    seq_len = seq_len_of(w / "anchor")
    blocks = mixed_blocks(w / "data", anchor.tokenizer, seq_len, args.split, args.blocks)
    half = seq_len // 2
    sizes = {f"{a}>{b}": len(x) for (a, b), x in blocks.items()}
    res: dict = {"split": args.split, "seq_len": seq_len, "blocks": sizes}
    t0 = time.time()
    for name, make in variants(w, anchor, dense, trust, args.decay, args.switch).items():
        lm, per = make(), {}
        for (a, b), x in blocks.items():
            s = score(lm, x)
            per[f"{a}>{b}"] = {"first": ppl_ci(s[:, 0], half - 1), "second": ppl_ci(s[:, 1], half)}
        res[name] = per
        print(f"{name:40s} {time.time() - t0:6.0f}s", flush=True)
    ref = {}  # the dense model of the second half's owner, given the same block
    for (a, b), x in blocks.items():
        if b != "public":
            ref[f"{a}>{b}"] = {"second": ppl_ci(score(dense[b], x)[:, 1], half)}
    res["dense of the second half's owner"] = ref
    _print(res)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))


def _print(res: dict) -> None:
    pairs = list(res["blocks"])
    models = [k for k in res if isinstance(res[k], dict) and k != "blocks"]
    print("second half perplexity (after the switch), per ordered pair:")
    print(f"{'model':40s} " + " ".join(f"{p:>13s}" for p in pairs) + "  geo-mean owner>owner")
    for m in models:
        row = [res[m].get(p, {}).get("second", {}).get("ppl") for p in pairs]
        oo = [v for p, v in zip(pairs, row, strict=True) if v and "public" not in p]
        gm = math.exp(sum(map(math.log, oo)) / len(oo)) if oo else float("nan")
        print(f"{m:40s} " + " ".join(f"{v:13.1f}" if v else " " * 13 for v in row) + f"  {gm:10.1f}")


if __name__ == "__main__":
    main()
