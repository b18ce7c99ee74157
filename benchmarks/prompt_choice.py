"""A generation's one choice at the prompt's end, by each kind of evidence, on a finished ``flexmoe
demo`` workdir: prompts are the first ``L`` tokens of each domain's documents of one split; reported are
how often the choice names the prompt's own domain (public for public text) and the perplexity of the
next ``--continuation`` tokens routed by that choice (what generation then computes), beside the choice
by hand (public + the domain's owner; public alone for public text). Validates
``SequenceRouting.prompt_evidence`` for base models (chat models: ``benchmarks/prompt_evidence.py``), and
the switch rule's effect on it (likelihood with and without ``SequenceRouting.switch``).

    PYTHONPATH=src python benchmarks/prompt_choice.py WORKDIR [--split valid] [--lengths 16 64] [--docs 64]
"""

import argparse
import json
import math
from pathlib import Path

import torch

from flexmoe.data import read_documents
from flexmoe.demo import OWNERS
from flexmoe.moe import Routing, routing
from flexmoe.runtime import from_pretrained
from flexmoe.signing import ALLOW_UNSIGNED


def _named(names: list[str], row: torch.Tensor) -> str:
    """The owner a choice row ``[E]`` names, ``public`` (public only) or ``undecided`` (every expert)."""
    owners = row[1:].nonzero().flatten().tolist()
    return "public" if not owners else names[owners[0] + 1] if len(owners) == 1 else "undecided"


@torch.no_grad()
def _continuation_ppl(c, texts: torch.Tensor, choice: torch.Tensor, L: int) -> float:
    """Perplexity of ``texts[:, L:]`` with every position routed by ``choice`` ``[B, E]``."""
    seq, c.sequence = c.sequence, None
    try:
        with routing(Routing(mask=choice[:, None, :].expand(-1, texts.shape[1], -1))):
            logits = c.model(texts).logits[:, L - 1 : -1].float()
    finally:
        c.sequence = seq
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), texts[:, L:])
    return math.exp(float(loss))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--split", default="valid")
    ap.add_argument("--lengths", type=int, nargs="*", default=[16, 64])
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--continuation", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(2)
    c = from_pretrained(args.workdir / "models/flexolmo", trust=ALLOW_UNSIGNED, sequence_routing=True)
    decoder, s = c.model.get_decoder(), c.sequence
    out = {}
    for d in ("public", *OWNERS):
        docs = read_documents([args.workdir / "data" / d / f"{args.split}.jsonl"])
        ids = [c.tokenizer(t)["input_ids"] for t in docs]
        for L in args.lengths:
            n = L + args.continuation
            texts = torch.tensor([x[:n] for x in ids if len(x) >= n][: args.docs], device=c.device)
            prompts = texts[:, :L]
            by_hand = torch.zeros(len(c.names), dtype=torch.bool)
            by_hand[[0] + ([c.names.index(d)] if d in c.names else [])] = True
            choices = {"by hand": by_hand.to(c.device).expand(len(texts), -1)}
            default = s.switch
            for label, kind, switch in (
                ("likelihood", "likelihood", default),
                ("likelihood, no switch", "likelihood", math.inf),
                ("rows", "rows", default),
            ):
                s.prompt_evidence, s.switch = kind, switch
                with torch.no_grad():
                    choices[label] = s.prompt_choice(decoder, prompts)
            s.switch = default
            for kind, last in choices.items():
                named = [_named(c.names, r) for r in last]
                right = sum(x == d for x in named) / len(named)
                ppl = _continuation_ppl(c, texts, last, L)
                out[f"{d} L={L} {kind}"] = {"right": right, "n": len(named), "continuation_ppl": ppl}
                print(
                    f"{d:>7s} L={L:<3d} {kind:>10s}: own domain chosen {right:.2f} of {len(named)}, "
                    f"continuation perplexity {ppl:.2f}",
                    flush=True,
                )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
