"""Decode speed: stock transformers FlexOlmo vs flexmoe's runtime, batch 1 and batch 32, side by side.

Both models have the same shapes (an OLMo 2 attention stack with FlexOlmo MoE FFNs: by default the
issue's 1.28B dense config, hidden 2048, 16 layers, FFN 8192, with 8 experts and top-4, 6.9B parameters
in all) and random bf16 weights; decode speed does not depend on the values. Each method generates
``--new-tokens`` tokens greedily after a ``--prompt-len`` prompt (EOS disabled, so every run decodes the
same number of tokens), with

- ``eager``: the default dynamic KV cache, no compilation;
- ``static``: ``cache_implementation="static"`` with the decode step compiled (transformers compiles the
  forward for a static cache on its own when ``compile_config`` allows it).

Timing: ``--warmup`` untimed generations, then ``--repeats`` timed ones (CUDA synchronised); reported
is the median decode tokens/s (batch x new tokens / wall time of the generation, prefill included,
which is small at these lengths) and the ratio flexmoe / stock per setting.

The memory-bandwidth floor: a decode step must read every weight it uses once. At batch 1 that is the
attention stack, embeddings/LM head and the top-k experts of each layer; at batch 32 nearly every expert
is chosen by some token, so all weights. floor tokens/s = batch * bandwidth / bytes read per step
(``--bandwidth`` GB/s, H200: 4800). The KV cache is small at these lengths and is ignored.

Usage::

    python benchmarks/decode_speed.py --device cuda --json decode.json
    .venv/bin/python benchmarks/decode_speed.py --preset tiny --device cpu   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from transformers import FlexOlmoConfig, FlexOlmoForCausalLM, Olmo2Config, Olmo2ForCausalLM

from flexmoe.moe import FlexMoEBlock, RouterRow, decoder_layers

SHAPES = {
    # the 1.28B OLMo 2 config
    "1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        intermediate_size=8192,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=100352,
    ),
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=2,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=4096,
    ),
}


def stock_model(shape: dict, experts: int, top_k: int, device, dtype) -> torch.nn.Module:
    cfg = FlexOlmoConfig(
        **shape,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=False,
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    with torch.device(device):
        return FlexOlmoForCausalLM(cfg).to(dtype).eval()


def flexmoe_model(shape: dict, experts: int, top_k: int, device, dtype) -> torch.nn.Module:
    """The anchor's dense class with every FFN replaced by a ``FlexMoEBlock`` (flexmoe's runtime)."""
    cfg = Olmo2Config(
        **shape, max_position_embeddings=4096, pad_token_id=0, eos_token_id=1, bos_token_id=None
    )
    with torch.device(device):
        model = Olmo2ForCausalLM(cfg).to(dtype)
        for layer in decoder_layers(model):
            ffns = []
            for _ in range(experts):
                ffn = copy.deepcopy(layer.mlp)
                for p in ffn.parameters():
                    torch.nn.init.normal_(p, std=0.02)
                ffns.append(ffn)
            rows = [RouterRow(torch.randn(shape["hidden_size"]) * 0.02) for _ in range(experts)]
            layer.mlp = FlexMoEBlock(ffns, rows, top_k=top_k)
            layer.mlp.fuse_experts_()  # as the runtime does: grouped matmuls over stacked expert weights
    return model.eval()


def weight_bytes(shape: dict, experts: int, top_k: int, batch: int, dtype_bytes: int = 2) -> float:
    H, Lyr, I, V = (
        shape["hidden_size"],
        shape["num_hidden_layers"],
        shape["intermediate_size"],
        shape["vocab_size"],
    )
    attn = 4 * H * H + 2 * H  # q, k, v, o (no GQA in these configs) + q/k norms
    ffn = 3 * H * I
    used = min(experts, top_k * batch)  # experts some token of the batch routes to, at most
    per_layer = attn + used * ffn + experts * H
    return dtype_bytes * (Lyr * per_layer + 2 * V * H)


@torch.no_grad()
def time_generate(
    model, batch: int, prompt_len: int, new: int, static: bool, warmup: int, repeats: int, device
) -> float:
    ids = torch.randint(10, 1000, (batch, prompt_len), device=device)
    kw = dict(
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        attention_mask=torch.ones_like(ids),
    )
    if static:
        kw["cache_implementation"] = "static"
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        assert out.shape[1] == prompt_len + new
    return batch * new / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bandwidth", type=float, default=4800.0, help="GB/s of device memory")
    ap.add_argument("--no-static", action="store_true", help="skip the static-cache + compiled runs")
    ap.add_argument("--static-only", action="store_true", help="skip the eager (dynamic cache) runs")
    ap.add_argument("--methods", default="stock,flexmoe", help="comma-separated subset of stock,flexmoe")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SHAPES[args.preset]
    torch.manual_seed(0)
    results = []
    settings = [False] if args.no_static else [True] if args.static_only else [False, True]
    builders = {"stock": stock_model, "flexmoe": flexmoe_model}
    for name, build in ((m, builders[m]) for m in args.methods.split(",")):
        model = build(shape, args.experts, args.top_k, device, dtype)
        for static in settings:
            for b in args.batches:
                try:
                    tps = time_generate(
                        model, b, args.prompt_len, args.new_tokens, static, args.warmup, args.repeats, device
                    )
                except Exception as exc:  # report what failed; keep measuring the rest
                    print(f"{name} static={static} batch={b}: FAILED {type(exc).__name__}: {exc}")
                    tps = float("nan")
                floor = b * args.bandwidth * 1e9 / weight_bytes(shape, args.experts, args.top_k, b)
                row = dict(
                    method=name,
                    static=static,
                    batch=b,
                    tokens_per_s=tps,
                    floor_tokens_per_s=floor,
                    floor_ratio=floor / tps if tps == tps else None,
                )
                print(json.dumps(row), flush=True)
                results.append(row)
                if args.json:  # after every row: a run cut short still leaves what it measured
                    with open(args.json + "l", "a") as fh:
                        fh.write(json.dumps(row) + "\n")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    by = {(r["method"], r["static"], r["batch"]): r["tokens_per_s"] for r in results}
    print("\n| setting | batch | stock tok/s | flexmoe tok/s | flexmoe / stock | floor tok/s |")
    print("|---|---|---|---|---|---|")
    for static in settings:
        for b in args.batches:
            s, f = by.get(("stock", static, b), float("nan")), by.get(("flexmoe", static, b), float("nan"))
            floor = next(r["floor_tokens_per_s"] for r in results if r["batch"] == b)
            print(
                f"| {'static+compile' if static else 'eager'} | {b} | {s:.1f} | {f:.1f} | "
                f"{f / s:.2f}x | {floor:.0f} |"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "args": vars(args),
                    "results": results,
                    "torch": torch.__version__,
                    "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                },
                fh,
                indent=1,
            )


if __name__ == "__main__":
    main()
