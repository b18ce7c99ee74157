"""Training speed side by side in one run: stock dense fine-tuning, stock FlexOlmo, flexmoe; eager and
with each decoder layer compiled.

Setups, all on one random-weight OLMo 2 anchor and one random token batch (default: the 1.28B config of
issue 14, hidden 2048, 16 layers, FFN 8192, batch 8 x 2048, bf16 autocast, fp32 master weights):

- ``dense``    stock ``transformers`` ``Olmo2ForCausalLM``, every parameter trainable (fine-tuning).
- ``flexolmo`` stock ``transformers`` ``FlexOlmoForCausalLM``, 2 experts (both the anchor FFN), top-2;
               only expert 1 and router row 1 should train: HF fuses experts into 3-D parameters, so
               expert 0's gradient slice is zeroed after backward (``benchmarks/expert_training.py``).
- ``flexmoe``  ``flexmoe.moe.anchored_expert_model`` prepared as ``flexmoe.training.train`` prepares it
               on a GPU: frozen weights stored in bf16 (``frozen_to_bf16_``), LM loss + router z-loss,
               bias projection after each step.

Each eager and with ``flexmoe.training.compile_layers_`` (``torch.compile`` of every decoder layer).
Every setup uses AdamW (fused on CUDA, as the loop does), gradient clipping at 1.0, ``zero_grad(None)``.
After ``--warmup`` untimed steps (compilation happens there), ``--steps`` timed steps; reported:
tokens/s, MFU against ``--peak-tflops`` (989: H100/H200 dense bf16) with the model FLOPs of
``benchmarks/expert_training.py`` (anchored training counts only useful work), peak memory
(``torch.cuda.max_memory_allocated`` from model build to the end) and ratios against dense eager and
against stock FlexOlmo of the same mode.

``--cpu-compare`` instead times the CPU tiny path (anchored expert training through the training loop
itself, ``flexmoe.training.train``, on the tiny preset) for this checkout and for ``--baseline-ref`` (a
git ref of the code before, extracted with ``git archive``), alternating runs in fresh subprocesses,
and prints the ratio.

Usage::

    python benchmarks/training_speed.py --out speed.json                      # 1.28B on one GPU
    python benchmarks/training_speed.py --preset tiny --device cpu --steps 2 --warmup 1 \
        --compile-backend eager --out t.json                                    # CPU smoke run
    python benchmarks/training_speed.py --cpu-compare --baseline-ref 25584ed --out cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from expert_training import flops_per_token, hf_from_anchor, router_rows  # noqa: E402

from flexmoe.anchor import PRESETS, Preset, olmo2_config  # noqa: E402
from flexmoe.moe import anchored_expert_model, project_biases_, router_z_loss  # noqa: E402
from flexmoe.training import (  # noqa: E402
    TrainConfig,
    autocast,
    compile_layers_,
    frozen_to_bf16_,
    lm_loss,
    make_optimizer,
)

ROOT = Path(__file__).resolve().parents[1]
ISSUE_1B = Preset(2048, 8192, 16, 16, 100352, 2048, 0, 8, 1e-4, 0, 0)  # the issue's 1.28B config
SETUPS = ("dense", "flexolmo", "flexmoe")
Z_LOSS = 1e-3


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="1b", choices=["1b", *PRESETS], help="1b: the issue's 1.28B config")
    ap.add_argument("--batch-size", type=int, default=None, help="default 8 (1b) or the preset's")
    ap.add_argument("--seq-len", type=int, default=None, help="default 2048 (1b) or the preset's")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per setup")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    ap.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    ap.add_argument(
        "--setups", default=",".join(SETUPS), help="comma-separated subset of " + ",".join(SETUPS)
    )
    ap.add_argument("--modes", default="eager,compiled", help="eager, compiled or both")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--compile-backend", default="inductor", help="eager: a quick CPU check of the wiring")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    ap.add_argument(
        "--cpu-compare", action="store_true", help="CPU tiny path: this checkout vs --baseline-ref"
    )
    ap.add_argument(
        "--baseline-ref", default="25584ed", help="git ref of the code before (default: issue 14's base)"
    )
    ap.add_argument("--rounds", type=int, default=3, help="--cpu-compare: alternating runs per side")
    ap.add_argument("--loop-steps", type=int, default=20, help="--cpu-compare: training steps per run")
    ap.add_argument("--time-loop", action="store_true", help=argparse.SUPPRESS)  # --cpu-compare child
    return ap.parse_args(argv)


def preset_of(args) -> Preset:
    p = ISSUE_1B if args.preset == "1b" else PRESETS[args.preset]
    return dataclasses.replace(
        p, batch_size=args.batch_size or p.batch_size, seq_len=args.seq_len or p.seq_len
    )


# --------------------------------------------------------------------------------------------------
# Setups


class Setup:
    """A model, its trainable parameters, optimiser and step hooks."""

    def __init__(self, model, loss_fn, device, post_backward=None, after_step=None):
        self.model, self.loss_fn = model, loss_fn
        self.post_backward, self.after_step = post_backward, after_step
        self.params = [p for p in model.parameters() if p.requires_grad]
        cfg = TrainConfig(lr=1e-4, weight_decay=0.0)
        self.opt = make_optimizer([{"params": self.params}], cfg, fused=device.type == "cuda")


def build(name: str, p: Preset, device: torch.device, seed: int) -> Setup:
    from transformers import Olmo2ForCausalLM

    torch.manual_seed(seed)
    anchor = Olmo2ForCausalLM(olmo2_config(p)).float()
    if name == "dense":
        return Setup(anchor.to(device).train(), lm_loss, device)
    pub, own = router_rows(p, seed)
    if name == "flexmoe":
        model = anchored_expert_model(anchor, pub, own).to(device).train()
        if device.type == "cuda":
            frozen_to_bf16_(model)  # what training.train does on a GPU

        def loss_fn(m, batch):
            loss = lm_loss(m, batch)
            return loss + Z_LOSS * router_z_loss(model).to(loss.device)

        return Setup(model, loss_fn, device, after_step=lambda: project_biases_(model))
    model = hf_from_anchor(anchor, pub, own, "default")
    del anchor
    fused = []
    for n, prm in model.named_parameters():
        prm.requires_grad_(".mlp.experts." in n or n.endswith(".mlp.gate.weight"))
        if prm.requires_grad:
            fused.append(prm)

    def mask_expert0():
        for prm in fused:
            if prm.grad is not None:
                prm.grad[0].zero_()

    return Setup(model.to(device).train(), lm_loss, device, post_backward=mask_expert0)


def step(s: Setup, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    with autocast(device):
        loss = s.loss_fn(s.model, batch)
    loss.backward()
    if s.post_backward is not None:
        s.post_backward()
    torch.nn.utils.clip_grad_norm_(s.params, 1.0)
    s.opt.step()
    s.opt.zero_grad(set_to_none=True)
    if s.after_step is not None:
        s.after_step()
    return loss.detach()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, mode: str, p: Preset, args, device) -> dict:
    """Build one setup, warm up, time ``--steps`` steps; tokens/s, MFU, peak memory."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    s = build(name, p, device, args.seed)
    if mode == "compiled":
        # Every setup's layers share transformers' forward code: without a reset, their compiled
        # variants pile up in one cache until dynamo's recompile limit silently falls back to eager.
        torch.compiler.reset()
        compile_layers_(s.model, backend=args.compile_backend)
    g = torch.Generator().manual_seed(args.seed + 7)
    batch = torch.randint(0, p.vocab_size, (p.batch_size, p.seq_len), generator=g).to(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step(s, batch, device)
    sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    total = torch.zeros((), device=device)
    for _ in range(args.steps):
        total += step(s, batch, device).float()
    sync(device)
    seconds = time.perf_counter() - t0
    tok_s = args.steps * p.batch_size * p.seq_len / seconds
    fpt = flops_per_token(olmo2_config(p), p.seq_len)["dense" if name == "dense" else "flexmoe"]
    out = {
        "setup": name,
        "mode": mode,
        "tokens_per_s": tok_s,
        "step_s": seconds / args.steps,
        "warmup_s": warmup_s,
        "mean_loss": float(total) / args.steps,
        "flops_per_token": fpt,
        "mfu": tok_s * fpt / (args.peak_tflops * 1e12) if device.type == "cuda" else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "trainable_params": sum(x.numel() for x in s.params),
    }
    del s, batch
    gc.collect()
    return out


def ratios(rows: list[dict]) -> None:
    """Each row against dense eager and against stock FlexOlmo of the same mode."""
    by = {(r["setup"], r["mode"]): r for r in rows}
    for r in rows:
        base = by.get(("dense", "eager"))
        flex = by.get(("flexolmo", r["mode"]))
        r["vs_dense_eager"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        r["vs_stock_flexolmo_same_mode"] = r["tokens_per_s"] / flex["tokens_per_s"] if flex else None


def table(rows: list[dict]) -> str:
    lines = [
        "| setup | mode | tokens/s | MFU | peak GiB | x dense eager | x stock FlexOlmo (same mode) |",
        "|---|---|---|---|---|---|---|",
    ]
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['setup']} | {r['mode']} | {r['tokens_per_s']:,.0f} | {f(r['mfu'], '.1%')} | "
            f"{f(r['peak_memory_gib'], '.1f')} | {f(r['vs_dense_eager'], '.2f')} | "
            f"{f(r['vs_stock_flexolmo_same_mode'], '.2f')} |"
        )
    return "\n".join(lines)


def machine(device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return info


# --------------------------------------------------------------------------------------------------
# --cpu-compare: the CPU tiny path, this checkout against the code before


def time_loop(steps: int) -> float:
    """Seconds of ``steps`` anchored expert-training steps through the loop (tiny preset, CPU), with
    whichever ``flexmoe.training`` API this process imports (before or after the one-loop refactor)."""
    from transformers import Olmo2ForCausalLM

    from flexmoe import training

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    p = PRESETS["tiny"]
    torch.manual_seed(0)
    anchor = Olmo2ForCausalLM(olmo2_config(p)).float()
    pub, own = router_rows(p, 0)
    model = anchored_expert_model(anchor, pub, own)
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, p.vocab_size, (64, p.seq_len), generator=g)
    valid = blocks[:1]
    cfg = dict(steps=steps, batch_size=p.batch_size, seq_len=p.seq_len, lr=2e-3, warmup_steps=2)
    cfg |= dict(eval_every=10**9, checkpoint_every=10**9, log_every=10**9)

    def loss_fn(m, batch):
        loss = training.lm_loss(m, batch)
        return loss + Z_LOSS * router_z_loss(model).to(loss.device)

    after = lambda: project_biases_(model)  # noqa: E731
    if hasattr(training, "Stage"):  # the one loop
        stage = training.Stage(
            training.PackedBlocks(blocks), valid, training.LMStep(loss_fn), after_step=after
        )
        result = training.train(model, training.TrainConfig(**cfg), stage, training.RunOptions(quiet=True))
    else:  # the loop before
        result = training.train(
            model, blocks, valid, training.TrainConfig(**cfg), loss_fn=loss_fn, after_step=after, quiet=True
        )
    return result.seconds


def cpu_compare(args) -> dict:
    """Alternating fresh-process runs of ``time_loop`` for this checkout and ``--baseline-ref``."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.baseline_ref, "src"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        sides = {"now": str(ROOT / "src"), f"before ({args.baseline_ref})": str(Path(tmp) / "src")}
        seconds: dict[str, list[float]] = {k: [] for k in sides}
        for _ in range(args.rounds):
            for side, src in sides.items():
                env = {**os.environ, "PYTHONPATH": src}
                cmd = [sys.executable, __file__, "--time-loop", "--loop-steps", str(args.loop_steps)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                seconds[side].append(float(out.strip().splitlines()[-1]))
    p = PRESETS["tiny"]
    tokens = args.loop_steps * p.batch_size * p.seq_len
    res = {
        k: {"seconds": v, "median_tokens_per_s": tokens / statistics.median(v)} for k, v in seconds.items()
    }
    now, before = (res[k]["median_tokens_per_s"] for k in sides)
    res["ratio_now_over_before"] = now / before
    return res


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.time_loop:
        print(time_loop(args.loop_steps))
        return {}
    device = torch.device(args.device)
    if args.cpu_compare:
        res = {"cpu_compare": cpu_compare(args), "machine": machine(torch.device("cpu")), "argv": sys.argv}
        for k, v in res["cpu_compare"].items():
            print(f"{k}: {v}")
    else:
        p = preset_of(args)
        rows = []
        for mode in args.modes.split(","):
            for name in args.setups.split(","):
                r = measure(name, mode, p, args, device)
                rows.append(r)
                print(f"{name:9s} {mode:8s} {r['tokens_per_s']:>12,.0f} tok/s", file=sys.stderr, flush=True)
        ratios(rows)
        print(table(rows))
        res = {
            "rows": rows,
            "preset": args.preset,
            "config": dataclasses.asdict(p),
            "machine": machine(device),
        }
        res["argv"] = sys.argv
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
