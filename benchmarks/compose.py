"""Peak memory and wall time of ``flexmoe.compose.compose`` as the number of experts grows.

Builds once, in a work directory, a random-weight OLMo 2 anchor (bfloat16 safetensors) and synthetic
expert packages (float32 tensors with the names and shapes training writes, manifests carrying the
anchor fingerprint), then composes the anchor with 1, 2, 4, 8 ... experts, each in a fresh
subprocess, so that the child's peak resident memory is that run's own. A child that only imports
flexmoe and torch gives the baseline, so the table can show compose's own increment.

Peak RSS is the child's ``VmHWM`` (high-water mark of its own address space). ``ru_maxrss`` is reported
too, but Linux carries it across ``fork``/``execve`` from the parent (a child of a 900 MiB parent
reports at least 900 MiB), so it is only trustworthy because the parent here stays small: building
runs in a child as well.

    .venv/bin/python benchmarks/compose.py --json /tmp/compose-bench.json

Streaming compose should have a peak RSS that does not grow with the number of experts (about one
output shard plus one tensor above the baseline). Composed outputs are deleted after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

MiB = 1024**2
BUILD_JSON = "build.json"


# --------------------------------------------------------------------------------------------------
# Building the inputs (once per work directory and size)


def build_params(args) -> dict:
    return {
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "layers": args.layers,
        "vocab": args.vocab,
        "heads": args.hidden // 64,
        "seed": 0,
    }


def build_anchor(path: Path, p: dict) -> None:
    import torch
    from transformers import Olmo2Config, Olmo2ForCausalLM

    cfg = Olmo2Config(
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        intermediate_size=p["intermediate"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["heads"],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(p["seed"])
    # Build directly in bfloat16: half the memory and init time of a float32 model cast afterwards.
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Olmo2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    del model
    os.replace(tmp, path)


def build_package(path: Path, k: int, p: dict, anchor_fp: str, public: list) -> None:
    """One synthetic package, as ``train_expert`` writes it (float32 tensors, full manifest)."""
    import torch

    from flexmoe.expert.package import write_package

    H, I, L = p["hidden"], p["intermediate"], p["layers"]
    g = torch.Generator().manual_seed(1000 + k)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(L):
        tensors[f"layers.{i}.gate_proj.weight"] = torch.randn(I, H, generator=g).mul_(0.02)
        tensors[f"layers.{i}.up_proj.weight"] = torch.randn(I, H, generator=g).mul_(0.02)
        tensors[f"layers.{i}.down_proj.weight"] = torch.randn(H, I, generator=g).mul_(0.02)
        tensors[f"layers.{i}.router.weight"] = torch.randn(H, generator=g)
        tensors[f"layers.{i}.router.bias"] = torch.tensor(-0.01 * k, dtype=torch.float32)
        tensors[f"layers.{i}.public_router.weight"] = public[i]
    name = f"bench-{k}"
    manifest = {
        "name": name,
        "description": f"synthetic benchmark expert {k}",
        "contact": "",
        "license": "proprietary: usage terms set by the owner",
        "anchor": {
            "fingerprint": anchor_fp,
            "model_type": "olmo2",
            "num_hidden_layers": L,
            "hidden_size": H,
            "intermediate_size": I,
        },
        "router_init": "random",
        "bias_init": 0.0,
        "training": {"preset": "synthetic", "steps": 0, "z_loss": 1e-3},
        "tokens_seen": 0,
        "seconds": 0.0,
        "data": {"fingerprint": f"sha256:synthetic-{k}", "train_documents": 0, "valid_documents": 0},
        "valid_loss": {"anchor": None, "expert": None},
        "history": [],
        "dp": None,
    }
    write_package(path, tensors, manifest, force=True)


def build(workdir: Path, p: dict, n_packages: int) -> tuple[Path, list[Path]]:
    """Anchor and packages under ``workdir``, reused when the recorded sizes match."""
    import torch

    from flexmoe.anchor import fingerprint
    from flexmoe.fileio import read_json, write_json

    workdir.mkdir(parents=True, exist_ok=True)
    anchor = workdir / "anchor"
    pkgs = [workdir / "packages" / f"expert-{k}" for k in range(n_packages)]
    record = workdir / BUILD_JSON
    if record.is_file() and read_json(record).get("params") != p:
        print(f"[build] sizes changed; rebuilding in {workdir}", flush=True)
        shutil.rmtree(anchor, ignore_errors=True)
        shutil.rmtree(workdir / "packages", ignore_errors=True)
        record.unlink()
    if not anchor.is_dir():
        t0 = time.perf_counter()
        build_anchor(anchor, p)
        print(f"[build] anchor in {time.perf_counter() - t0:.1f}s", flush=True)
    anchor_fp = read_json(record)["fingerprint"] if record.is_file() else fingerprint(anchor)
    g = torch.Generator().manual_seed(7)
    public = [torch.randn(p["hidden"], generator=g) for _ in range(p["layers"])]
    for k, path in enumerate(pkgs):
        if (path / "expert.json").is_file():
            continue
        t0 = time.perf_counter()
        build_package(path, k, p, anchor_fp, public)  # one package in memory at a time
        print(f"[build] package {k} in {time.perf_counter() - t0:.1f}s", flush=True)
    write_json(record, {"params": p, "fingerprint": anchor_fp})
    return anchor, pkgs


# --------------------------------------------------------------------------------------------------
# Children: one fresh process per measurement


class RssSampler(threading.Thread):
    """Peak anonymous and file-backed RSS from /proc/self/status (ru_maxrss gives only the sum)."""

    def __init__(self, interval: float = 0.02):
        super().__init__(daemon=True)
        self.interval, self.peak = interval, {"RssAnon": 0, "RssFile": 0}
        self.stop = threading.Event()

    def sample(self) -> None:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(line.split()[1]))

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)


def status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peaks() -> dict:
    return {
        "hwm_kb": status_kb("VmHWM"),
        "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def child_baseline() -> None:
    import torch  # noqa: F401

    import flexmoe  # noqa: F401
    import flexmoe.compose  # noqa: F401

    print(json.dumps({**peaks(), "rss_kb": status_kb("VmRSS")}))


def child_compose(anchor: str, packages: list[str], out: str, shard_bytes: int) -> None:
    from flexmoe.compose import UNSIGNED_OK, ComposeSettings, compose

    sampler = RssSampler()
    sampler.sample()
    before = dict(sampler.peak)
    hwm_before = status_kb("VmHWM")
    sampler.start()
    t0 = time.perf_counter()
    compose(
        Path(anchor),
        [Path(p) for p in packages],
        Path(out),
        ComposeSettings(max_shard_bytes=shard_bytes),
        provenance=UNSIGNED_OK,
    )
    seconds = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    sampler.sample()
    result = {
        "seconds": seconds,
        **peaks(),
        "peak_rss_anon_kb": sampler.peak["RssAnon"],
        "peak_rss_file_kb": sampler.peak["RssFile"],
        "rss_before_kb": before["RssAnon"] + before["RssFile"],
        "hwm_before_kb": hwm_before,
    }
    print(json.dumps(result))


def run_child(argv: list[str], echo: bool = False) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, check=False)
    if echo:
        sys.stdout.write("".join(proc.stdout.splitlines(keepends=True)[:-1]))
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child {argv[:1]} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --------------------------------------------------------------------------------------------------


def table(baseline_mib: float, rows: list[dict]) -> str:
    lines = [
        f"Baseline (child importing flexmoe + torch only): {baseline_mib:.0f} MiB peak RSS.",
        "",
        "| experts | written (MiB) | peak RSS (MiB) | over baseline (MiB) | "
        "peak anon / file RSS (MiB) | seconds (median) | MiB/s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['experts']} | {r['bytes_written'] / MiB:,.0f} | {r['peak_rss_mib']:,.0f} | "
            f"{r['peak_rss_mib'] - baseline_mib:,.0f} | "
            f"{r['peak_rss_anon_mib']:,.0f} / {r['peak_rss_file_mib']:,.0f} | "
            f"{r['seconds']:.1f} | {r['mib_per_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/flexmoe-bench-compose"))
    ap.add_argument("--experts", default="1,2,4,8", help="comma-separated expert counts")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-mb", type=int, default=512, help="max_shard_bytes, in MiB")
    ap.add_argument("--repeat", type=int, default=3, help="runs per expert count (median time, max RSS)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    # internal: the measured children
    ap.add_argument("--child", choices=["build", "baseline", "compose"], help=argparse.SUPPRESS)
    ap.add_argument("--anchor", help=argparse.SUPPRESS)
    ap.add_argument("--packages", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shard_bytes = args.shard_mb * MiB

    params = build_params(args)
    if args.child == "build":
        anchor, pkgs = build(args.workdir, params, int(args.packages))
        print(json.dumps({"anchor": str(anchor), "packages": [str(p) for p in pkgs]}))
        return None
    if args.child == "baseline":
        return child_baseline()
    if args.child == "compose":
        return child_compose(args.anchor, args.packages.split(","), args.out, shard_bytes)

    counts = sorted({int(x) for x in args.experts.split(",") if x.strip()})
    if args.hidden % 64:
        raise SystemExit("--hidden must be a multiple of 64 (head dim 64)")
    t0 = time.perf_counter()
    # Built in a child so that this process stays small (see the module docstring on ru_maxrss).
    sizes = ["--hidden", str(args.hidden), "--intermediate", str(args.intermediate)]
    sizes += ["--layers", str(args.layers), "--vocab", str(args.vocab)]
    built = run_child(
        ["--child", "build", "--workdir", str(args.workdir), "--packages", str(max(counts)), *sizes],
        echo=True,
    )
    anchor, pkgs = Path(built["anchor"]), [Path(p) for p in built["packages"]]
    print(f"[build] ready in {time.perf_counter() - t0:.1f}s", flush=True)
    pkg_mib = dir_bytes(pkgs[0]) / MiB
    anchor_mib = dir_bytes(anchor) / MiB
    print(f"[build] anchor {anchor_mib:.0f} MiB, one package {pkg_mib:.0f} MiB", flush=True)

    # Minimum of three runs, to keep one-off import noise out of the baseline.
    base = [run_child(["--child", "baseline"]) for _ in range(3)]
    baseline_mib = min(b["hwm_kb"] for b in base) / 1024
    print(f"[run] baseline peak RSS {baseline_mib:.0f} MiB", flush=True)
    rows = []
    out = args.workdir / "composed"
    child = [
        "--child",
        "compose",
        "--anchor",
        str(anchor),
        "--out",
        str(out),
        "--shard-mb",
        str(args.shard_mb),
    ]
    for n in counts:
        runs = []
        for _ in range(args.repeat):
            shutil.rmtree(out, ignore_errors=True)
            r = run_child([*child, "--packages", ",".join(str(p) for p in pkgs[:n])])
            r["bytes_written"] = dir_bytes(out)
            shutil.rmtree(out, ignore_errors=True)
            runs.append(r)
            print(
                f"[run] {n} experts: {r['bytes_written'] / MiB:,.0f} MiB written, "
                f"peak RSS {r['hwm_kb'] / 1024:,.0f} MiB (anon {r['peak_rss_anon_kb'] / 1024:,.0f}, "
                f"file {r['peak_rss_file_kb'] / 1024:,.0f}), {r['seconds']:.1f}s",
                flush=True,
            )
        # Peak RSS: the highest of the repeats; time: the median (writeback makes it noisy).
        worst = max(runs, key=lambda r: r["hwm_kb"])
        seconds = statistics.median(r["seconds"] for r in runs)
        written = runs[0]["bytes_written"]
        rows.append(
            {
                "experts": n,
                "bytes_written": written,
                "peak_rss_mib": worst["hwm_kb"] / 1024,
                "ru_maxrss_mib": worst["maxrss_kb"] / 1024,
                "peak_rss_anon_mib": worst["peak_rss_anon_kb"] / 1024,
                "peak_rss_file_mib": worst["peak_rss_file_kb"] / 1024,
                "rss_before_compose_mib": worst["rss_before_kb"] / 1024,
                "seconds": seconds,
                "seconds_all": [r["seconds"] for r in runs],
                "peak_rss_mib_all": [r["hwm_kb"] / 1024 for r in runs],
                "mib_per_s": written / MiB / seconds,
            }
        )

    text = table(baseline_mib, rows)
    print()
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "params": params,
                    "shard_mib": args.shard_mb,
                    "repeat": args.repeat,
                    "anchor_mib": anchor_mib,
                    "package_mib": pkg_mib,
                    "baseline_rss_mib": baseline_mib,
                    "baseline_runs": base,
                    "python": platform.python_version(),
                    "rows": rows,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
