"""Expert training through the real training loop on 1..N processes: plain, FSDP2, FSDP2 + activation
checkpointing, and dense fine-tuning of the same anchor as the MFU reference.

Every mode runs ``flexmoe.training.train`` (the code ``flexmoe expert train`` runs) on a random-weight
OLMo 2 anchor of a ``flexmoe.anchor`` preset and random tokens (same global batch and data order for
every world size, so loss curves are comparable). Launch under torchrun for several GPUs::

    python benchmarks/expert_scaling.py --preset small --modes plain,fsdp,fsdp_ac,dense --json out.json
    torchrun --nproc-per-node 2 benchmarks/expert_scaling.py --preset small --modes fsdp --json out2.json

Reported per mode (rank 0): tokens/s over the timed steps (the first ``--warmup`` steps excluded),
MFU = tokens/s * model FLOPs per token / (world * ``--peak-tflops``), peak GPU memory per rank
(``torch.cuda.max_memory_allocated``) and the training-loss curve. Scaling efficiency is
tokens/s(N) / (N * tokens/s(1)) between two such JSON files (``--compare one.json``).
FLOPs per token: ``flops_per_token`` of ``benchmarks/expert_training.py`` (formulas there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from expert_training import flops_per_token  # noqa: E402

from flexmoe.anchor import PRESETS, olmo2_config  # noqa: E402
from flexmoe.moe import anchored_expert_model, project_biases_, router_z_loss  # noqa: E402
from flexmoe.training import (  # noqa: E402
    LMStep,
    PackedBlocks,
    RunOptions,
    Stage,
    TrainConfig,
    dist_info,
    init_distributed,
    lm_loss,
    train,
)


def build(preset, mode: str, device: torch.device, seed: int):
    from transformers import Olmo2ForCausalLM

    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = Olmo2ForCausalLM(olmo2_config(preset)).to(dtype)
    if mode != "dense":
        g = torch.Generator().manual_seed(seed + 1)
        rows = torch.randn(2, preset.num_layers, preset.hidden_size, generator=g) * 0.02
        anchored_expert_model(model, rows[0], rows[1])
    elif device.type == "cuda":
        model = model.float()  # dense fine-tuning keeps fp32 master weights, like the experts do
    return model.to(device)


def run_mode(args, mode: str, device: torch.device) -> dict:
    p = replace(PRESETS[args.preset], seq_len=args.seq_len or PRESETS[args.preset].seq_len)
    model = build(p, mode, device, args.seed)
    g = torch.Generator().manual_seed(args.seed + 2)
    blocks = torch.randint(0, p.vocab_size, (args.batch_size * (args.steps + 1), p.seq_len), generator=g)
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        seq_len=p.seq_len,
        lr=1e-4,
        warmup_steps=1,
        eval_every=10**9,
        checkpoint_every=10**9,
        log_every=1,
        fsdp=mode.startswith("fsdp"),
        activation_checkpointing=mode.endswith("_ac"),
    )
    anchored = mode != "dense"

    def loss_fn(m, batch):
        loss = lm_loss(m, batch)
        return loss + 1e-3 * router_z_loss(model).to(loss.device) if anchored else loss

    stamps: list[float] = []

    def after_step():
        if anchored:
            project_biases_(model)
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stage = Stage(PackedBlocks(blocks), blocks[: args.batch_size], LMStep(loss_fn), after_step=after_step)
    res = train(model, cfg, stage, RunOptions(quiet=True, device=device))
    timed = stamps[args.warmup - 1 :]
    tok_s = (len(timed) - 1) * args.batch_size * p.seq_len / (timed[-1] - timed[0])
    _, world = dist_info()
    fpt = flops_per_token(olmo2_config(p), p.seq_len)["dense" if mode == "dense" else "flexmoe"]
    out = {
        "mode": mode,
        "world": world,
        "tokens_per_s": tok_s,
        "flops_per_token": fpt,
        "loss": [h["train_loss"] for h in res.history if "train_loss" in h],
    }
    if device.type == "cuda":
        out["peak_mib_per_rank"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["mfu"] = tok_s * fpt / (world * args.peak_tflops * 1e12)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=list(PRESETS))
    ap.add_argument("--modes", default="plain,fsdp,fsdp_ac,dense")
    ap.add_argument("--batch-size", type=int, default=32, help="global sequences per step")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100 SXM)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--compare", type=Path, default=None, help="1-process JSON for scaling efficiency")
    args = ap.parse_args()
    device = init_distributed()
    rank, world = dist_info()
    results = []
    for mode in args.modes.split(","):
        results.append(run_mode(args, mode, device))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next mode's peak memory starts from the same floor
    if args.compare and args.compare.exists():
        base = {r["mode"]: r for r in json.loads(args.compare.read_text())["results"]}
        for r in results:
            if r["mode"] in base:
                r["scaling_efficiency"] = r["tokens_per_s"] / (world * base[r["mode"]]["tokens_per_s"])
    if rank != 0:
        return
    report = {
        "date": datetime.date.today().isoformat(),
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world": world,
        "batch_size": args.batch_size,
        "command": " ".join(sys.argv),
        "results": results,
    }
    for r in results:
        extra = f"  MFU {100 * r['mfu']:.2f}%  peak {r['peak_mib_per_rank']:,.0f} MiB" if "mfu" in r else ""
        line = f"{args.preset} {r['mode']:8s} world {world}: {r['tokens_per_s']:,.0f} tok/s{extra}"
        print(line, flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
