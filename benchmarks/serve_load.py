"""Load test of ``flexmoe serve``: N concurrent streaming clients on loopback, beside plain transformers
``generate`` serving the same requests one at a time, in one run.

    python benchmarks/serve_load.py --model demo-run/model --clients 1 8 32 --out serve_load.json

For each N: N clients each send ``--requests`` streaming completions back to back (greedy,
``ignore_eos`` so every request makes ``--max-tokens`` tokens); reported: generated tokens/s over the
wall time, p50/p99 request latency and time to first token. The baseline loads the same directory with
stock ``AutoModelForCausalLM`` (the ``flex_olmo`` export) and runs the same prompts one at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import torch

PROMPTS = ["def fibonacci(n):", "The parties agree that", "12 * 7 =", "Once upon a time", "The court"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def one(client: httpx.AsyncClient, model: str, prompt: str, n: int) -> tuple[float, float, int]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    t0, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise SystemExit(f"the server answered an error under load: {chunk['error']}")
            if first is None and chunk["choices"][0]["text"]:
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if tokens != n:  # ignore_eos: every request must make exactly n tokens
        raise SystemExit(f"a request made {tokens} of {n} tokens: the load result would be meaningless")
    return time.perf_counter() - t0, first or 0.0, tokens


async def load(url: str, model: str, clients: int, requests: int, n: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def worker(w: int):
            return [await one(client, model, PROMPTS[(w + i) % len(PROMPTS)], n) for i in range(requests)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(w) for w in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    lat = [r[0] for r in results]
    ttft = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "p50_s": pct(lat, 0.5),
        "p99_s": pct(lat, 0.99),
        "ttft_p50_s": pct(ttft, 0.5),
        "ttft_p99_s": pct(ttft, 0.99),
    }


def baseline(model_dir: Path, requests: int, n: int, device: str) -> dict:
    """Stock transformers generate, one request at a time (what serving without batching gives)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    lat, tokens = [], 0
    t0 = time.perf_counter()
    for i in range(requests):
        ids = tok(PROMPTS[i % len(PROMPTS)], return_tensors="pt", add_special_tokens=False).to(device)
        t1 = time.perf_counter()
        out = model.generate(
            **ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id or 0
        )
        lat.append(time.perf_counter() - t1)
        tokens += out.shape[1] - ids["input_ids"].shape[1]
    wall = time.perf_counter() - t0
    return {
        "clients": 1,
        "requests": requests,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "p50_s": pct(lat, 0.5),
        "p99_s": pct(lat, 0.99),
    }


def start_server(
    model: Path, port: int, device: str, max_batch: int, tmp: Path, allow_unsigned: bool = False
) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "flexmoe",
        "serve",
        str(model),
        "--port",
        str(port),
        "--name",
        "m",
        "--device",
        device,
        "--max-batch",
        str(max_batch),
        "--db",
        f"sqlite:///{tmp / 'ledger.sqlite'}",
        "--audit-log",
        str(tmp / "audit.jsonl"),
    ] + (["--allow-unsigned"] if allow_unsigned else [])
    log = tmp / "server.log"  # shown when the server does not start (e.g. an unsigned model)
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f, env=dict(os.environ))
    for _ in range(1200):
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).raise_for_status()
            return proc
        except httpx.HTTPError:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                raise SystemExit("the server did not start: " + " / ".join(tail)) from None
            time.sleep(0.25)
    proc.kill()
    raise SystemExit("the server did not answer in 5 minutes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--baseline-requests", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path("serve_load.json"))
    ap.add_argument("--allow-unsigned", action="store_true", help="serve an unsigned composed model")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads for baseline and server (OMP_NUM_THREADS)",
    )
    args = ap.parse_args()
    if args.threads:
        # Same thread count on both sides: an oversubscribed OpenMP pool on a busy CPU is 10-40x slower.
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    tmp = args.out.parent / (args.out.stem + "-run")
    tmp.mkdir(parents=True, exist_ok=True)
    base = baseline(args.model, args.baseline_requests, args.max_tokens, args.device)
    print(f"transformers generate, 1 at a time: {base['tokens_per_s']:.1f} tok/s, p50 {base['p50_s']:.2f}s")
    port = free_port()
    proc = start_server(args.model, port, args.device, max(args.clients), tmp, args.allow_unsigned)
    rows = []
    try:
        asyncio.run(load(f"http://127.0.0.1:{port}", "m", 1, 1, 4))  # warm-up
        for n in args.clients:
            r = asyncio.run(load(f"http://127.0.0.1:{port}", "m", n, args.requests, args.max_tokens))
            r["vs_baseline"] = r["tokens_per_s"] / base["tokens_per_s"]
            rows.append(r)
            print(
                f"{n:3d} clients: {r['tokens_per_s']:.1f} tok/s ({r['vs_baseline']:.2f}x), "
                f"p50 {r['p50_s']:.2f}s p99 {r['p99_s']:.2f}s, ttft p50 {r['ttft_p50_s']:.2f}s"
            )
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    out = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "command": " ".join(sys.argv),
        "max_tokens": args.max_tokens,
        "baseline": base,
        "server": rows,
    }
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
