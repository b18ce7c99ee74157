"""Graph breaks inside one compiled decoder layer, shown with ``torch._dynamo.explain``.

Two layers of flexmoe's models are checked: a layer of the anchored 2-expert training model (what
expert training compiles, with the router z-loss recorded) and a layer of the inference runtime with
8 experts, top-4, the grouped path, and a per-sequence expert mask plus routing record (what the server
runs). A host synchronisation (``bool(tensor)``, ``.item()``, ``nonzero``) in the MoE forward would
show up here as a graph break.

Usage::

    python benchmarks/graph_breaks.py --device cuda     # the 1.28B config
    .venv/bin/python benchmarks/graph_breaks.py --preset tiny --device cpu
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
import torch._dynamo
from transformers import Olmo2Config, Olmo2ForCausalLM

from flexmoe.moe import FlexMoEBlock, RouterRow, Routing, anchored_expert_model, decoder_layers, routing

SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=2, intermediate_size=8192, num_attention_heads=16),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, intermediate_size=512, num_attention_heads=4),
}


def layer_inputs(model, batch: int, seq: int, device) -> tuple[torch.Tensor, tuple]:
    x = torch.randn(batch, seq, model.config.hidden_size, device=device)
    pos = torch.arange(seq, device=device)[None].expand(batch, -1)
    return x, model.model.rotary_emb(x, pos)


def explain(layer, x, pe, mask=None) -> dict:
    def run(x):
        with routing(Routing(mask=mask, record=mask is not None)):
            return layer(x, attention_mask=None, position_embeddings=pe)

    torch._dynamo.reset()
    e = torch._dynamo.explain(run)(x)
    return {
        "graphs": e.graph_count,
        "graph_breaks": e.graph_break_count,
        "reasons": [str(b.reason) for b in e.break_reasons],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    shape = SHAPES[args.preset]
    cfg = Olmo2Config(**shape, vocab_size=1024, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    H, L = shape["hidden_size"], shape["num_hidden_layers"]
    out = {}
    with torch.device(device):
        train_model = anchored_expert_model(Olmo2ForCausalLM(cfg), torch.randn(L, H), torch.randn(L, H))
        train_model.train()
        x, pe = layer_inputs(train_model, 2, 64, device)
        out["training layer (2 experts, top-2)"] = explain(decoder_layers(train_model)[0], x, pe)

        infer = Olmo2ForCausalLM(cfg).eval()
        for layer in decoder_layers(infer):
            ffns = [copy.deepcopy(layer.mlp) for _ in range(8)]
            layer.mlp = FlexMoEBlock(ffns, [RouterRow(torch.randn(H)) for _ in range(8)], top_k=4)
            layer.mlp.fuse_experts_()
        x, pe = layer_inputs(infer, 4, 16, device)
        mask = torch.ones(4, 8, dtype=torch.bool)
        mask[1, 3] = False  # one sequence leaves one expert out
        with torch.no_grad():
            out["inference layer (8 experts, top-4, per-sequence mask)"] = explain(
                decoder_layers(infer)[0], x, pe, mask
            )
    for name, r in out.items():
        print(f"{name}: {r['graphs']} graph(s), {r['graph_breaks']} graph break(s)")
        for reason in r["reasons"]:
            print(f"   break: {reason}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
