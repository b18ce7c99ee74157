"""Where a decode step's time goes: kernels per generated token and the most expensive kernels, for the
stock FlexOlmo and flexmoe's runtime (the same shapes as ``decode_speed.py``), static KV cache.

Companion to ``decode_speed.py`` when a ratio there needs explaining (it showed, for instance, that at
batch 1 a gather of the chosen experts' weights is slower than grouped matmuls over all of them).

    python benchmarks/decode_profile.py --device cuda --batch 1 --json prof.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from decode_speed import SHAPES, flexmoe_model, stock_model, time_generate
from torch.profiler import ProfilerActivity, profile


def kernel_table(model, batch: int, new: int, device) -> dict:
    """Profile one generation; kernels per token and the top kernels by device time."""
    ids = torch.randint(10, 1000, (batch, 16), device=device)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.generate(ids, attention_mask=torch.ones_like(ids), cache_implementation="static", **kw)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time_total for e in events)
    top = sorted(events, key=lambda e: -e.device_time_total)[:12]
    return {
        "kernels_per_token": sum(e.count for e in events) / new,
        "device_ms_per_token": total / 1000 / new,
        "top": [{"name": e.key[:90], "count": e.count, "ms": e.device_time_total / 1000} for e in top],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--methods", nargs="+", default=["stock", "flexmoe"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), torch.bfloat16
    shape, rows = SHAPES[args.preset], []
    for method in args.methods:
        build = stock_model if method == "stock" else flexmoe_model
        model = build(shape, args.experts, args.top_k, device, dtype)
        torch._dynamo.reset()
        t0 = time.perf_counter()
        tps = time_generate(model, args.batch, 128, args.new_tokens, True, 1, 2, device)
        row = {"method": method, "batch": args.batch, "tokens_per_s": tps}
        row.update(kernel_table(model, args.batch, 16, device))
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rows, fh, indent=1)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
