"""The whole federation end to end, offline: corpora, anchor, each owner's expert trained in its own
working directory from its own data only, composition, opt-out, baselines, evaluation, report.

Every step writes its output under ``workdir`` and is skipped when that output already exists, so an
interrupted demo continues where it stopped.
"""

from __future__ import annotations

import contextlib
import math
import platform
import shutil
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from rich.console import Console

from flexmoe.anchor import default_embedder, load_anchor, load_config, pretrain
from flexmoe.audit.demo import (
    PRIVACY_PRESETS,
    PrivacyRun,
    dp_expert_jobs,
    plant_demo_canaries,
    privacy_section,
)
from flexmoe.compose import ComposeSettings, Provenance, compose, load_meta, remove
from flexmoe.corpora import build_demo_corpora
from flexmoe.errors import FlexmoeError
from flexmoe.evaluate import baselines as B
from flexmoe.evaluate.composition import CompositionSetup, evaluate_composition
from flexmoe.evaluate.report import (
    FLEXOLMO_MODELS,
    MERGING_MODELS,
    composition_table,
    headline,
    merging_verdict,
    write_report,
)
from flexmoe.evaluate.run import EvalSettings, evaluate_lm, load_lm
from flexmoe.evaluate.tasks import load_tasks
from flexmoe.expert.package import MANIFEST, signed_package
from flexmoe.expert.shared import check_mode
from flexmoe.expert.train import EXPERT_PRESETS, PUBLIC_MIX, ExpertSpec, train_expert
from flexmoe.fileio import read_json, save_pretrained_atomic
from flexmoe.jobs import Job, JobPool, default_workers, job_pool, on_loaded, usable_cpus
from flexmoe.router.calibrate import calibrator
from flexmoe.router.proxy import ProxySettings, select_proxy
from flexmoe.router.train import train_router
from flexmoe.signing import Trust, generate_keys, load_private_key
from flexmoe.tokenizer import load_tokenizer

OWNERS = ("code", "math", "legal")


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class DemoPreset:
    anchor: str
    expert: str
    size_mb: float
    anchor_steps: int | None
    expert_steps: int
    btx_steps: int
    eval_blocks: int
    eval_items: int | None
    router_init: str = "embed"
    public_mix: float = PUBLIC_MIX  # share of public sequences in each owner's training (router negatives)
    shared_rows: str = "none"  # embedding / LM-head rows each owner trains (flexmoe.expert.shared)
    shared_attention: bool = False  # each owner trains the attention projections too
    rt_steps: int = 30  # router training on the proxy sets (flexolmo_rt)
    # Hashed n-grams: the MiniLM embedder needs about 45 s per owner for this pool on 2 CPU cores, and
    # the demo's domains are separable either way (held-out accuracy in the proxy manifests).
    proxy_features: str = "ngram"
    proxy_fraction: float = 0.05
    #: processes that train and score independent models side by side (None: two on a CPU with two
    #: or more cores, one on a GPU; ``flexmoe.jobs``)
    workers: int | None = None
    #: items per evaluation task written with the corpora (``eval_items`` may score fewer): enough that
    #: the paired FlexOlmo-minus-baseline interval can tell the small preset's models apart
    task_items: int = 100


DEMO_PRESETS = {
    # Sized for 15 minutes on 2 CPU cores, measured step by step in BENCHMARKS.md.
    "tiny": DemoPreset("tiny", "tiny", 2.0, 300, 120, 40, 32, 50),
    # The demo corpora are small (a few MB per domain): step counts keep epochs in single digits.
    "small": DemoPreset("small", "small", 5.0, 200, 60, 40, 64, None, task_items=400),
    # For tests: minutes become seconds; numbers mean nothing.
    "test": DemoPreset("tiny", "tiny", 0.3, 20, 6, 4, 4, 8, router_init="hidden", rt_steps=2),
}


@dataclass(frozen=True)
class DemoKeys:
    """The demo's Ed25519 keys, made on first use inside ``workdir`` and kept for a resumed run: each
    owner's in its own directory (it signs that owner's packages), and the maintainer's (it signs
    every composed model, and a model user trusts its public key)."""

    workdir: Path

    def owner(self, domain: str):
        return _key(self.workdir / "owners" / domain / "keys" / "owner")

    def maintainer(self):
        return _key(self.workdir / "keys" / "maintainer")

    def provenance(self) -> Provenance:
        """The maintainer's: packages signed by the demo's owners only; what it writes, signed."""
        for d in OWNERS:
            self.owner(d)  # made on first use
        pubs = [_pub(self.workdir / "owners" / d / "keys" / "owner") for d in OWNERS]
        return Provenance(trust=Trust.from_paths(pubs), sign_key=self.maintainer())

    def model_trust(self) -> Trust:
        """A model user's: composed models signed by the maintainer only."""
        self.maintainer()
        return Trust.from_paths([_pub(self.workdir / "keys" / "maintainer")])


def _key(path: Path):
    """The private key at ``path``, made (with its public key beside it) on first use."""
    if not (path.is_file() and _pub(path).is_file()):
        generate_keys(path, force=True)
    return load_private_key(path)


def _pub(path: Path) -> Path:
    return path.with_name(path.name + ".pub")


class Steps:
    """Times named steps and prints what is happening; ``run_all`` runs independent jobs on ``pool``."""

    def __init__(self, quiet: bool, pool: JobPool | None = None):
        self.quiet = quiet
        self.pool = pool or JobPool(1)
        self.seconds: dict[str, float] = {}
        self.console = Console(stderr=True, highlight=False, quiet=quiet)

    def run(self, name: str, fn, *args, **kwargs):
        return self.run_all([Job(name, fn, args, kwargs)])[0]

    def run_all(self, jobs: list[Job]) -> list:
        """The jobs' results in order; with two or more workers they run side by side."""
        side = self.pool.workers > 1 and len(jobs) > 1
        return self.pool.run(jobs, lambda job: self._started(job, side), lambda *a: self._done(*a, side))

    def _started(self, job: Job, side: bool) -> None:
        self.console.print(f"[bold cyan]== {job.name}[/]" + (" (side by side)" if side else ""))

    def _done(self, job: Job, out, seconds: float, side: bool) -> None:
        self.seconds[job.name] = self.seconds.get(job.name, 0.0) + seconds
        if side:
            self.console.print(f"   {job.name}: done in {seconds:.0f} s")


def run_demo(
    workdir: Path, preset: str = "tiny", *, quiet: bool = False, overrides: dict | None = None
) -> dict:
    """Run (or continue) the demo in ``workdir``; returns the report (also written to disk)."""
    p = demo_preset(preset, overrides)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with job_pool(p.workers or default_workers(device())) as pool:
        steps = Steps(quiet, pool)
        report = _federation(workdir, preset, p, steps)
    report["preset"] = preset
    report["environment"] = environment(p, pool.workers)
    report["seconds"] = steps.seconds
    report["wall_seconds"] = time.perf_counter() - start
    write_report(report, workdir)
    return report


def _federation(workdir: Path, preset: str, p: DemoPreset, steps: Steps) -> dict:
    """Every step of the demo, each skipped when its output exists; returns the report."""
    data, anchor, models = workdir / "data", workdir / "anchor", workdir / "models"
    if not data.exists():
        steps.run("corpora", build_demo_corpora, data, size_mb=p.size_mb, task_items=p.task_items)
    privacy = PRIVACY_PRESETS.get(preset)
    if privacy is not None:  # before any owner trains: the audit needs secrets in the training data
        plant_demo_canaries(workdir, data, privacy)
    train_anchor(data, anchor, p, steps, steps.quiet)
    keys = DemoKeys(workdir)
    dp = privacy_run(workdir, anchor, privacy, p, steps, keys) if privacy is not None else None
    # Everything that needs only the anchor, side by side on a CPU; the longest first.
    jobs = [unrestricted_job(models, anchor, data, p, steps.quiet)]
    jobs += [owner_job(workdir, data, anchor, d, p, steps.quiet) for d in OWNERS]
    jobs += dense_jobs(models, anchor, data, p, steps.quiet) + (dp_expert_jobs(dp) if dp is not None else [])
    steps.run_all([j for j in jobs if j is not None])  # None: trained by an earlier run
    packages = [workdir / "owners" / d / "expert" for d in OWNERS]
    proxies = [select_owner_proxy(workdir, d, p, steps, steps.quiet) for d in OWNERS]
    # Each owner signs what it sends, once its proxy record is in the manifest.
    packages = [signed_package(pkg, keys.owner(d)) for pkg, d in zip(packages, OWNERS, strict=True)]
    compose_and_opt_out(models, anchor, packages, steps, keys)
    router_variants(models, anchor, data, packages, proxies, p, steps, keys)
    build_baselines(models, anchor, data, p, steps)
    report = evaluate_all(models, data, anchor, packages, p, steps, keys.model_trust())
    if dp is not None:
        report["privacy"] = privacy_report(dp, report)
    return report


def environment(p: DemoPreset, workers: int = 1) -> dict:
    """What the numbers depend on besides the code: libraries, the router init actually used (``embed``
    falls back to ``hidden`` without the embedder's packages), the machine. CPU results differ across
    processors and library versions; this says which ones a report came from."""

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    libs = ("transformers", "tokenizers", "sentence-transformers")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{name: installed(name) for name in libs},
        "router_init": p.router_init,
        "device": device(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpus": usable_cpus(),
        # jobs side by side, each on cpus // workers threads (float sums differ in the last bits)
        "workers": workers,
    }


def _cpu_name() -> str | None:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:  # Linux; elsewhere what platform says
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def demo_preset(preset: str, overrides: dict | None = None) -> DemoPreset:
    """The named preset with ``overrides`` of its fields, on what this machine has."""
    if preset not in DEMO_PRESETS:
        raise FlexmoeError(f"Unknown demo preset {preset!r}.", f"use one of {', '.join(DEMO_PRESETS)}.")
    p = replace(DEMO_PRESETS[preset], **(overrides or {}))
    check_mode(p.shared_rows)  # before the corpora and the anchor, not after
    if p.router_init == "embed" and default_embedder() is None:  # e.g. a GPU box without flexmoe[embed]
        p = replace(p, router_init="hidden")
    return p


def train_anchor(data: Path, anchor: Path, p: DemoPreset, steps: Steps, quiet: bool) -> None:
    """The maintainer pretrains the anchor on the public pool (kept when it exists)."""
    if not anchor.exists():
        embedder = "default" if p.router_init == "embed" else None
        steps.run(
            "anchor",
            pretrain,
            data / "public",
            anchor,
            p.anchor,
            steps=p.anchor_steps,
            quiet=quiet,
            embedder=embedder,
        )


def privacy_run(
    workdir: Path, anchor: Path, privacy, p: DemoPreset, steps: Steps, keys: DemoKeys
) -> PrivacyRun:
    """The privacy section's settings (``flexmoe.audit.demo``) with the demo's settings and keys."""
    return PrivacyRun(
        workdir,
        workdir / "data",
        anchor,
        privacy,
        expert_preset=p.expert,
        router_init=p.router_init,
        public_mix=p.public_mix,
        eval_blocks=p.eval_blocks,
        eval_items=p.eval_items,
        steps=steps,
        quiet=steps.quiet,
        owner_key=keys.owner(privacy.owner),
        provenance=keys.provenance(),
        trust=keys.model_trust(),
    )


def privacy_report(run: PrivacyRun, report: dict) -> dict:
    out = privacy_section(run, report)
    out["seconds"] = sum(v for k, v in run.steps.seconds.items() if k.startswith(("dp expert", "privacy:")))
    return out


def owner_job(workdir: Path, data: Path, anchor: Path, domain: str, p: DemoPreset, quiet: bool) -> Job | None:
    """One data owner: its own directory holding only its own train/valid data, and the job that trains
    its expert there (None: trained already)."""
    home = workdir / "owners" / domain
    package = home / "expert"
    if package.exists():
        _check_kept_shared(package, p)
        return None
    (home / "data").mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):  # the test split stays with the evaluator
        shutil.copy2(data / domain / f"{split}.jsonl", home / "data" / f"{split}.jsonl")
    # Public data is public: every owner has its own copy (no other owner's data is there).
    (home / "public").mkdir(exist_ok=True)
    shutil.copy2(data / "public" / "train.jsonl", home / "public" / "train.jsonl")
    spec = ExpertSpec(
        name=domain,
        description=f"demo {domain} data",
        contact=f"{domain}-owner@example.org",
        router_init=p.router_init,
    )
    return Job(
        f"expert {domain}",
        train_expert,
        (anchor, [home / "data"], domain, package, p.expert),
        dict(
            spec=spec,
            steps=p.expert_steps,
            quiet=quiet,
            public=[home / "public"],
            public_mix=p.public_mix,
            shared_rows=p.shared_rows,
            shared_attention=p.shared_attention,
        ),
    )


def train_owner(
    workdir: Path, data: Path, anchor: Path, domain: str, p: DemoPreset, steps: Steps, quiet: bool
):
    """``owner_job`` run now; returns the owner's package (trained, or kept from an earlier run)."""
    if (job := owner_job(workdir, data, anchor, domain, p, quiet)) is not None:
        steps.run(job.name, job.fn, *job.args, **job.kwargs)
    return workdir / "owners" / domain / "expert"


def _check_kept_shared(package: Path, p: DemoPreset) -> None:
    """A resumed demo keeps the experts it trained: refuse one trained with other shared tensors."""
    kept = read_json(package / MANIFEST).get("settings", {})
    rows, attention = kept.get("shared_rows", "none"), kept.get("shared_attention", False)
    if rows != p.shared_rows:
        raise FlexmoeError(
            f"{package} was trained with --shared-rows {rows}, this run asks for {p.shared_rows}.",
            f"use a fresh --workdir, or pass --shared-rows {rows}.",
        )
    if attention != p.shared_attention:
        raise FlexmoeError(
            f"{package} was trained {'with' if attention else 'without'} --shared-attention, this run asks "
            f"{'for' if p.shared_attention else 'without'} it.",
            "use a fresh --workdir, or the same --shared-attention choice.",
        )


def compose_and_opt_out(
    models: Path, anchor: Path, packages: list[Path], steps: Steps, keys: DemoKeys
) -> None:
    """The maintainer composes the owners' signed packages and signs every model it writes."""
    prov = keys.provenance()
    if not (models / "flexolmo").exists():
        steps.run("compose", compose, anchor, packages, models / "flexolmo", provenance=prov)
    for d in OWNERS:
        if not (models / f"flexolmo_without_{d}").exists():
            out = models / f"flexolmo_without_{d}"
            steps.run("opt-out", remove, models / "flexolmo", d, out, provenance=prov)


def select_owner_proxy(workdir: Path, domain: str, p: DemoPreset, steps: Steps, quiet: bool) -> Path:
    """The owner, on its own machine, picks public documents like its data; only those leave."""
    home = workdir / "owners" / domain
    out = home / "proxy"
    if not out.exists():
        steps.run(
            f"proxy {domain}",
            select_proxy,
            [home / "data"],
            [home / "public"],
            out,
            ProxySettings(fraction=p.proxy_fraction, features=p.proxy_features, max_private=500, quiet=quiet),
            package=home / "expert",
        )
    return out


# Router training on the proxy sets vs data-free calibration, each also after one owner opts out.
REMOVED = "legal"
ROUTER_ROWS = (
    "flexolmo_rt",
    "flexolmo_calibrated",
    f"flexolmo_rt_without_{REMOVED}",
    f"flexolmo_calibrated_without_{REMOVED}",
)


def router_variants(
    models: Path,
    anchor: Path,
    data: Path,
    packages: list[Path],
    proxies: list[Path],
    p: DemoPreset,
    steps: Steps,
    keys: DemoKeys,
) -> None:
    public = [data / "public"]
    rt, cal = models / "flexolmo_rt", models / "flexolmo_calibrated"
    prov = keys.provenance()
    if not rt.exists():
        steps.run(
            "router training",
            train_router,
            models / "flexolmo",
            proxies,
            public,
            rt,
            steps=p.rt_steps,
            quiet=steps.quiet,
            sign_key=prov.sign_key,
        )
    if not (models / f"flexolmo_rt_without_{REMOVED}").exists():
        # Opt-out after router training: the owner's FFN and row go, the other trained rows stay.
        steps.run("opt-out", remove, rt, REMOVED, models / f"flexolmo_rt_without_{REMOVED}", provenance=prov)
    if not cal.exists():
        steps.run(
            "calibrate",
            compose,
            anchor,
            packages,
            cal,
            ComposeSettings(calibrate=calibrator(public)),
            provenance=prov,
        )
    if not (models / f"flexolmo_calibrated_without_{REMOVED}").exists():
        steps.run(
            "calibrate",
            remove,
            cal,
            REMOVED,
            models / f"flexolmo_calibrated_without_{REMOVED}",
            ComposeSettings(calibrate=calibrator(public)),
            provenance=prov,
        )


BASELINE_RECIPE = "baseline.json"  # beside a trained baseline's weights: how it was trained


def dense_recipe(p: DemoPreset, quiet: bool = True) -> B.BaselineTraining:
    """How the dense experts train: the owners' stream (their domain and the public mix), steps, batch,
    length and learning rate, so that BTM, soup and BTX compare with FlexOlmo on the same recipe."""
    ep = EXPERT_PRESETS[p.expert]
    return B.BaselineTraining(
        steps=p.expert_steps,
        batch_size=ep.batch_size,
        seq_len=ep.seq_len,
        lr=ep.lr,
        public_mix=p.public_mix,
        quiet=quiet,
    )


def _recipe_record(t: B.BaselineTraining) -> dict:
    return {k: v for k, v in asdict(t).items() if k != "quiet"}


def train_dense(anchor: Path, data: Path, public: Path, recipe: B.BaselineTraining, out: Path) -> None:
    """The anchor fully fine-tuned on one owner's data (``dense_recipe``), saved with its recipe."""
    tok = load_tokenizer(anchor)
    model, _ = B.dense_expert(load_anchor(anchor).to(device()), tok, data, recipe, public=public)
    save_pretrained_atomic(model, tok, out, files={BASELINE_RECIPE: _recipe_record(recipe)})


def dense_jobs(models: Path, anchor: Path, data: Path, p: DemoPreset, quiet: bool) -> list[Job]:
    """A job per dense expert not trained yet; a resumed demo keeps those trained with the same recipe
    and refuses others."""
    recipe, jobs = dense_recipe(p, quiet), []
    for d in OWNERS:
        out = models / f"dense_{d}"
        if out.exists():
            _check_kept(out, recipe)
        else:
            jobs.append(Job(f"dense {d}", train_dense, (anchor, data / d, data / "public", recipe, out)))
    return jobs


def _check_kept(out: Path, recipe: B.BaselineTraining) -> None:
    want = _recipe_record(recipe)
    kept = read_json(out / BASELINE_RECIPE) if (out / BASELINE_RECIPE).exists() else None
    if kept == want:
        return
    if kept is None:
        problem = "records no recipe (an older flexmoe trained it)"
    else:
        diff = [k for k in want if kept.get(k) != want[k]]
        problem = "was trained with " + ", ".join(f"{k} {kept.get(k)} (this run: {want[k]})" for k in diff)
    raise FlexmoeError(
        f"the baseline {out} {problem}; the baselines would compare on another recipe.",
        f"use a fresh --workdir, or delete {out} and {out.parent / 'model_soup'} to retrain them.",
    )


def train_unrestricted(anchor: Path, data: list[Path], recipe: B.BaselineTraining, out: Path) -> None:
    """The unrestricted MoE (4 experts, top-2) from the anchor on every domain pooled, saved."""
    tok = load_tokenizer(anchor)
    model, _ = B.unrestricted_moe(
        load_anchor(anchor).to(device()), tok, data, experts=4, top_k=2, settings=recipe
    )
    B.save_upcycled(model, tok, out, files={BASELINE_RECIPE: _recipe_record(recipe)})


def unrestricted_job(models: Path, anchor: Path, data: Path, p: DemoPreset, quiet: bool) -> Job | None:
    """The owners' recipe (``dense_recipe``) at the owners' total training FLOPs."""
    ep, config, out = EXPERT_PRESETS[p.expert], load_config(anchor), models / "unrestricted_moe"
    budget = len(OWNERS) * p.expert_steps * B.train_flops_per_token(config, "anchored", ep.seq_len)
    moe_steps = max(1, round(budget / B.train_flops_per_token(config, "moe", ep.seq_len, 4, 2)))
    recipe = replace(dense_recipe(p, quiet), steps=moe_steps)
    if out.exists():
        _check_kept(out, recipe)
        return None
    pooled = [data / d for d in ("public", *OWNERS)]
    return Job("unrestricted moe", train_unrestricted, (anchor, pooled, recipe, out))


def train_btx(anchor: Path, dense: list[Path], public: Path, recipe: B.BaselineTraining, out: Path) -> None:
    """BTX: the anchor and the dense experts upcycled (top-2), the router trained on public data, saved."""
    members = [load_anchor(m).to(device()).eval() for m in (anchor, *dense)]
    tok = load_tokenizer(anchor)
    model, _ = B.btx(members, tok, public, top_k=2, settings=recipe)
    B.save_upcycled(model, tok, out, files={BASELINE_RECIPE: _recipe_record(recipe)})


def build_baselines(models: Path, anchor: Path, data: Path, p: DemoPreset, steps: Steps) -> None:
    """Soup and BTX from the dense experts (trained side by side with the owners' experts)."""
    dense = [models / f"dense_{d}" for d in OWNERS]
    if not (models / "model_soup").exists():
        members = [load_anchor(m).to(device()).eval() for m in (anchor, *dense)]
        soup = steps.run("model soup", B.soup, members)
        save_pretrained_atomic(soup, load_tokenizer(anchor), models / "model_soup")
    ep = EXPERT_PRESETS[p.expert]
    recipe = B.BaselineTraining(
        steps=p.btx_steps, batch_size=ep.batch_size, seq_len=ep.seq_len, quiet=steps.quiet
    )
    if (models / "btx").exists():
        _check_kept(models / "btx", recipe)
    else:
        steps.run("btx", train_btx, anchor, dense, data / "public", recipe, models / "btx")


def load_btm(anchor: Path, dense: list[Path], device: str) -> B.BTMLM:
    """BTM over the anchor and the dense experts (``functools.partial`` of this loads it in a worker)."""
    return B.BTMLM([load_lm(m, device=device) for m in (anchor, *dense)])


def model_loaders(models: Path, anchor: Path, trust: Trust) -> dict:
    """How each evaluated model loads from disk (the composed ones as a model user would: signed by the
    maintainer, ``trust``), as ``functools.partial`` objects that a worker process can call."""
    dev, dense = device(), [models / f"dense_{d}" for d in OWNERS]
    todo = {"public": partial(load_lm, anchor, device=dev)}
    todo.update({f"dense_{d}": partial(load_lm, models / f"dense_{d}", device=dev) for d in OWNERS})
    todo["model_soup"] = partial(load_lm, models / "model_soup", device=dev)
    todo["btm"] = partial(load_btm, anchor, dense, dev)
    todo.update({m: partial(load_lm, models / m, device=dev) for m in ("btx", "unrestricted_moe")})
    composed = partial(load_lm, device=dev, trust=trust)
    todo["flexolmo"] = partial(composed, models / "flexolmo")
    # The same model routed per position by the text so far (flexmoe's runtime: one more forward pass).
    todo["flexolmo_sequence"] = partial(composed, models / "flexolmo", sequence_routing=True)
    # The same model with the owners' learned negative biases, which the HF flex_olmo format cannot
    # hold: flexmoe's runtime applies them (flexmoe_bias.safetensors). Measures what dropping them costs.
    todo["flexolmo_bias"] = partial(composed, models / "flexolmo", use_bias=True)
    todo.update(
        {f"flexolmo_without_{d}": partial(composed, models / f"flexolmo_without_{d}") for d in OWNERS}
    )
    todo.update({m: partial(composed, models / m) for m in ROUTER_ROWS if (models / m).exists()})
    return todo


def composition_jobs(
    models: Path, anchor: Path, data: Path, packages: list[Path], p: DemoPreset, trust: Trust
):
    """Issue 13's composition blocks of the composed model (its own router, and sequence routing),
    measured by the one function that ``flexmoe eval --composition`` uses."""
    setup = CompositionSetup(
        models / "flexolmo",
        data,
        OWNERS,
        anchor=anchor,
        packages=packages,
        seq_len=EXPERT_PRESETS[p.expert].seq_len,
        max_blocks=p.eval_blocks,
        device=device(),
        trust=trust,
    )
    sequence = replace(setup, sequence_routing=True)
    return [
        Job("composition", evaluate_composition, (setup,)),
        Job("composition (sequence routing)", evaluate_composition, (sequence,)),
    ]


# Started first, so that two workers finish together: each takes 2-8 times as long as the rest.
SLOW_JOBS = ("eval flexolmo_sequence", "composition (sequence routing)", "eval btm", "composition")


def evaluate_all(
    models: Path, data: Path, anchor: Path, packages: list[Path], p: DemoPreset, steps: Steps, trust: Trust
) -> dict:
    """Every model scored alike, and the composition blocks: one batch of jobs, side by side on a CPU;
    returns the report's scores, findings, composition blocks and headline."""
    loaders = model_loaders(models, anchor, trust)
    settings = EvalSettings(
        seq_len=EXPERT_PRESETS[p.expert].seq_len,
        max_blocks=p.eval_blocks,
        max_items=p.eval_items,
        domains=("public", *OWNERS),
    )
    jobs = [
        Job(f"eval {name}", on_loaded, (evaluate_lm, load, data, settings)) for name, load in loaders.items()
    ]
    jobs += composition_jobs(models, anchor, data, packages, p, trust)
    jobs.sort(key=lambda job: SLOW_JOBS.index(job.name) if job.name in SLOW_JOBS else len(SLOW_JOBS))
    done = {job.name: out for job, out in zip(jobs, steps.run_all(jobs), strict=True)}
    results = {name: done[f"eval {name}"] for name in loaders}
    for name, r in results.items():
        steps.console.print(f"   {name}: average {r['average']:.1f}")
    items = {t: len(v[: p.eval_items] if p.eval_items else v) for t, v in load_tasks(data).items()}
    report = {
        "domains": ["public", *OWNERS],
        "models": results,
        "items": items,
        **findings(results),
        "router": router_findings(results),
    }
    plain, seq = done["composition"], done["composition (sequence routing)"]
    for block in (plain, seq):
        steps.console.print(composition_table(block["composition"]))
    return report | {
        "composition": plain["composition"],
        "composition_detail": {"perplexity": plain["perplexity"], "how": plain["how"]},
        "composition_sequence": seq["composition"],
        "composition_sequence_detail": {"perplexity": seq["perplexity"], "how": seq["how"]},
        "headline": headline(results, inference_costs(anchor, models, p, trust)),
    }


def inference_costs(anchor: Path, models: Path, p: DemoPreset, trust: Trust | None = None) -> dict:
    """Inference cost per token of the headline models (BTM runs every dense model)."""
    config, seq_len = load_config(anchor), EXPERT_PRESETS[p.expert].seq_len
    inference_cost = B.inference_cost
    dense = inference_cost(config, "dense", seq_len)
    return {
        "public": dense,
        "model_soup": dense,
        "btm": inference_cost(config, "ensemble", seq_len, models=1 + len(OWNERS)),
        "btx": inference_cost(config, "moe", seq_len, top_k=2),
        "unrestricted_moe": inference_cost(config, "moe", seq_len, top_k=2),
        "flexolmo": inference_cost(
            config, "moe", seq_len, top_k=load_meta(models / "flexolmo", trust)["top_k"]
        ),
        # as scored here (likelihood evidence): the anchor pass, each owner's own model (public + its
        # expert), then the MoE pass over public + the chosen owner. Generating costs one MoE pass per
        # token after the prompt's choice.
        "flexolmo_sequence": {
            "forward_passes": 2 + len(OWNERS),
            "flops": dense["flops"]
            + (1 + len(OWNERS)) * inference_cost(config, "moe", seq_len, top_k=2)["flops"],
        },
    }


def router_findings(r: dict) -> list[str]:
    """Router training and calibration against plain FlexOlmo: average and per-domain perplexity."""
    out = []
    pairs = [("flexolmo", m) for m in ROUTER_ROWS[:2]] + [
        (f"flexolmo_without_{REMOVED}", m) for m in ROUTER_ROWS[2:]
    ]
    for base, m in pairs:
        if base not in r or m not in r:
            continue
        ppl = ", ".join(
            f"{d} {100 * (r[m]['perplexity'][d] / r[base]['perplexity'][d] - 1):+.1f}%"
            for d in ("public", *OWNERS)
        )
        out.append(
            f"{m} vs {base}: average {r[m]['average']:.1f} vs {r[base]['average']:.1f} "
            f"({r[m]['average'] - r[base]['average']:+.1f} points); perplexity change per domain: {ppl}."
        )
    return out


def findings(r: dict) -> dict:
    """The paper's claims checked on our numbers, stated plainly (met or not)."""
    pub, flex = r["public"], r["flexolmo"]
    out = []
    deltas = {d: 100 * (flex["perplexity"][d] / pub["perplexity"][d] - 1) for d in ("public", *OWNERS)}
    rel = 100 * (flex["average"] / max(pub["average"], 1e-9) - 1)
    out.append(
        f"FlexOlmo vs public model: average {flex['average']:.1f} vs {pub['average']:.1f} "
        f"({rel:+.1f}% ratio of averages); perplexity change per domain: "
        + ", ".join(f"{d} {v:+.1f}%" for d, v in deltas.items())
    )
    merging = {m: r[m]["average"] for m in MERGING_MODELS if m in r}
    if merging:
        best = max(merging, key=merging.get)
        margin = 100 * (flex["average"] / max(merging[best], 1e-9) - 1)
        out.append(
            f"Best merging baseline: {best} {merging[best]:.1f}; FlexOlmo margin {margin:+.1f}% "
            f"(paper: +10.1%). {'Met' if margin > 0 else 'NOT met'}."
        )
    out += [v for m in FLEXOLMO_MODELS if m in r and (v := merging_verdict(r, m))]
    if "unrestricted_moe" in r:
        gap = flex["average"] - r["unrestricted_moe"]["average"]
        out.append(
            f"Unrestricted MoE (pooled data, equal FLOPs) {r['unrestricted_moe']['average']:.1f}; "
            f"FlexOlmo {gap:+.1f} points (paper: 46.7 vs 46.3)."
        )
    if "flexolmo_bias" in r:
        b = r["flexolmo_bias"]
        out.append(
            f"Router biases (kept by flexmoe's runtime, dropped by the HF export that 'flexolmo' is): "
            f"average {b['average']:.1f} with vs {flex['average']:.1f} without; perplexity with/without: "
            + ", ".join(f"{d} {b['perplexity'][d] / flex['perplexity'][d]:.3f}x" for d in ("public", *OWNERS))
        )
    opt = []
    for d in OWNERS:
        w = r.get(f"flexolmo_without_{d}")
        if not w:
            continue
        # In loss (log-perplexity): perplexities of a tiny anchor span orders of magnitude, and a
        # linear difference would call a 3x worse perplexity "nothing lost".
        gain = math.log(pub["perplexity"][d] / flex["perplexity"][d])
        lost = math.log(w["perplexity"][d] / flex["perplexity"][d]) / gain if gain > 0 else float("nan")
        others = max(
            abs(w["perplexity"][o] / flex["perplexity"][o] - 1) for o in ("public", *OWNERS) if o != d
        )
        opt.append(
            f"without {d}: {100 * lost:.0f}% of FlexOlmo's loss gain on {d} is lost "
            f"(target: most); largest change in any other domain {100 * others:.2f}% (target < 2%). "
            f"{'Met' if lost > 0.5 and others < 0.02 else 'NOT met'}."
        )
    summary = (
        f"FlexOlmo average {flex['average']:.1f} vs public {pub['average']:.1f}"
        + (f"; best merging baseline {max(merging.values()):.1f}" if merging else "")
        + "."
    )
    return {
        "findings": out,
        "opt_out": opt,
        "summary": summary,
        "relative_improvement_percent": rel if math.isfinite(rel) else None,
    }
