"""DP expert-training cost: time per step and peak memory of DP-SGD against ordinary anchored training.

One random-weight anchor of a ``flexmoe.anchor`` preset (OLMo 2), turned into flexmoe's 2-expert training
model (``anchored_expert_model``), one random token batch of the preset's batch size and sequence length.
Methods, all with AdamW from ``flexmoe.training.make_optimizer`` over the same trainable tensors (owner
FFN, router row and bias):

  nondp         the step ``flexmoe.training.train`` runs for expert training: forward, LM loss + z-loss,
                backward, ``clip_grad_norm_(1.0)``, AdamW, bias projection.
  dp_hooks      the step ``flexmoe.expert.privacy.DPStep`` runs: per-sample loss, backward with Opacus'
                per-sample gradient hooks (flexmoe's ``RouterRow`` rule, Opacus' ``nn.Linear`` rule),
                per-sample clipping, Gaussian noise, AdamW, bias projection.
  dp_ghost      the same with Opacus ghost clipping (per-sample norms without per-sample gradients;
                two backward passes).
  dp_functorch  the same with per-sample gradients from ``torch.func`` for every layer.

The DP steps see a batch of exactly the preset's size (Poisson sampling would vary it around that
expectation; what is timed is the per-step work). Timing: ``--warmup`` untimed steps per method, then
``--repeats`` rounds of ``--steps`` steps, the method order rotating between rounds; reported: the median
over rounds of seconds per step, and its ratio to ``nondp``. Peak memory: each method alone in a fresh
subprocess (CPU: peak RSS, ``VmHWM`` reset after the model is built; CUDA: ``max_memory_allocated``).

Usage::

    .venv/bin/python benchmarks/dp_training.py --preset tiny --device cpu --json out.json
    python benchmarks/dp_training.py --preset small --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

METHODS = ("nondp", "dp_hooks", "dp_ghost", "dp_functorch")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="flexmoe.anchor preset (tiny, small, base)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the expert preset's")
    ap.add_argument("--seq-len", type=int, default=None, help="default: the expert preset's")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)  # memory probe
    return ap.parse_args(argv)


class Method:
    def __init__(self, name: str, args, device: torch.device):
        from transformers import Olmo2ForCausalLM

        from flexmoe.anchor import PRESETS, olmo2_config
        from flexmoe.expert import privacy as P
        from flexmoe.expert.train import EXPERT_PRESETS
        from flexmoe.moe import anchored_expert_model
        from flexmoe.training import TrainConfig, make_optimizer

        self.name, self.device, self.args = name, device, args
        ep = EXPERT_PRESETS.get(args.preset, EXPERT_PRESETS["tiny"])
        self.cfg = TrainConfig(
            batch_size=args.batch_size or ep.batch_size, seq_len=args.seq_len or ep.seq_len
        )
        p = PRESETS[args.preset]
        torch.manual_seed(0)
        model = Olmo2ForCausalLM(olmo2_config(p)).float()
        g = torch.Generator().manual_seed(1)
        rows = torch.randn(2, p.num_layers, p.hidden_size, generator=g) * p.hidden_size**-0.5
        self.model = anchored_expert_model(model, rows[0], rows[1]).to(device).train()
        self.params = [q for q in self.model.parameters() if q.requires_grad]
        self.opt = make_optimizer([{"params": self.params}], self.cfg)
        gen = torch.Generator().manual_seed(2)
        self.batch = torch.randint(
            0, p.vocab_size, (self.cfg.batch_size, self.cfg.seq_len), generator=gen
        ).to(device)
        self.vocab = p.vocab_size
        if name == "nondp":
            return
        from opacus.grad_sample import GradSampleHooks, GradSampleHooksFastGradientClipping
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

        P.register_grad_samplers()
        self.mode = name.removeprefix("dp_")
        ghost = self.mode == "ghost"
        kw = {"max_grad_norm": 1.0, "use_ghost_clipping": True} if ghost else {}
        self.hooks = (GradSampleHooksFastGradientClipping if ghost else GradSampleHooks)(
            self.model, loss_reduction="mean", force_functorch=self.mode == "functorch", **kw
        )
        self.dp_opt = (DPOptimizerFastGradientClipping if ghost else DPOptimizer)(
            self.opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=self.cfg.batch_size
        )

    def amp(self):
        if self.args.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self) -> None:
        from flexmoe.expert import privacy as P
        from flexmoe.moe import project_biases_, router_z_loss
        from flexmoe.training import lm_loss

        if self.name == "nondp":
            with self.amp():
                loss = lm_loss(self.model, self.batch) + 1e-3 * router_z_loss(self.model).to(self.device)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        else:
            with self.amp():
                # The fields of a privacy.DPStep that _dp_backward reads.
                loop = SimpleNamespace(model=self.model, params=self.params, device=self.device)
                step = SimpleNamespace(
                    loop=loop,
                    hooks=self.hooks,
                    dp_opt=self.dp_opt,
                    physical=len(self.batch),
                    z_loss=1e-3,
                    mode=self.mode,
                )
                P._dp_backward(step, self.batch, self.batch)
            self.dp_opt.step()
            self.dp_opt.zero_grad(set_to_none=True)
        project_biases_(self.model)

    def run(self, n: int) -> float:
        sync(self.device)
        t = time.perf_counter()
        for _ in range(n):
            self.step()
        sync(self.device)
        return (time.perf_counter() - t) / n


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_mib(field: str = "VmRSS") -> float:
    m = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(m.group(1)) / 1024 if m else -1.0


def memory_probe(args) -> dict:
    device = torch.device(args.device)
    import opacus  # noqa: F401  (imports count as baseline for every method)
    import transformers.models.olmo2.modeling_olmo2  # noqa: F401

    out = {"method": args.method}
    if device.type == "cpu":
        out["rss_after_imports_mib"] = rss_mib()
    m = Method(args.method, args, device)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        out["allocated_after_build_mib"] = torch.cuda.memory_allocated(device) / 2**20
    else:
        out["rss_after_build_mib"] = rss_mib()
        Path("/proc/self/clear_refs").write_text("5")
    m.run(args.warmup + args.steps)
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        out["peak_mib"] = rss_mib("VmHWM")
    return out


def machine(device) -> dict:
    import opacus
    import transformers

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "opacus": opacus.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    with contextlib.suppress(OSError):
        m = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        info["cpu"] = m.group(1).strip() if m else "?"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv=None) -> dict | None:
    import warnings

    # Layer 0's hooks fire on outputs only (the frozen anchor below it needs no input gradient).
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.method:
        print(json.dumps(memory_probe(args)))
        return None
    device = torch.device(args.device)
    names = [m for m in args.methods.split(",") if m]
    methods = {n: Method(n, args, device) for n in names}
    for m in methods.values():
        m.run(args.warmup)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            times[n].append(methods[n].run(args.steps))
        print(
            f"round {r + 1}/{args.repeats}: " + "  ".join(f"{n} {times[n][-1]:.3f}s" for n in names),
            file=sys.stderr,
        )
    cfg = next(iter(methods.values())).cfg
    res = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(device),
        "config": {
            **vars(args),
            "json": str(args.json),
            "batch_size": cfg.batch_size,
            "seq_len": cfg.seq_len,
        },
        "seconds_per_step": {n: statistics.median(v) for n, v in times.items()},
        "seconds_per_step_all": times,
    }
    base = res["seconds_per_step"].get("nondp")
    if base:
        res["ratio_to_nondp"] = {n: v / base for n, v in res["seconds_per_step"].items()}
    if not args.skip_memory:
        res["memory"] = {}
        for n in names:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--method", n, "--preset", args.preset]
            cmd += ["--device", args.device, "--dtype", args.dtype, "--steps", str(args.steps)]
            cmd += ["--warmup", str(args.warmup)]
            for flag, v in (
                ("--batch-size", args.batch_size),
                ("--seq-len", args.seq_len),
                ("--threads", args.threads),
            ):
                if v:
                    cmd += [flag, str(v)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"memory probe {n} failed:\n{r.stderr[-3000:]}")
            res["memory"][n] = json.loads(r.stdout.strip().splitlines()[-1])
    print(table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return res


def table(res: dict) -> str:
    mem = res.get("memory", {})
    lines = [
        "| method | s/step (median) | min - max | ratio to non-DP | peak memory (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for n, v in res["seconds_per_step"].items():
        all_ = res["seconds_per_step_all"][n]
        ratio = res.get("ratio_to_nondp", {}).get(n, float("nan"))
        peak = mem.get(n, {}).get("peak_mib", float("nan"))
        lines.append(f"| {n} | {v:.3f} | {min(all_):.3f} - {max(all_):.3f} | {ratio:.2f}x | {peak:,.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
