"""The post-training section of the demo (``flexmoe demo --post-train``): chat-tune the anchor, then
per owner SFT with three recipes (``RECIPES``): frozen (FlexOlmo: expert FFN + router row only),
progressive (ours: + the embedding and LM-head rows of the owner's own tokens) and BAR's progressive
(+ every embedding and LM-head row); merge (``disjoint`` for ours, BAR's ``mean`` for BAR's, and the
other merges as variants), route, opt out, and measure.

Measured on held-out prompts that no stage trained on (``flexmoe.chat_data``), greedy decoding:

- well_formed: share of generated turns that have content, end with ``<|im_end|>`` and hold no other
  control token (pooled over every owner's expert on its own tasks and the public prompts);
- task_gain[domain]: expert accuracy minus the post-trained anchor's on that domain's tasks;
- retention[domain]: the merged model's gain over the anchor divided by the gain of the expert it
  merged (ours for ``merged``; None when the expert gained nothing: there is nothing to retain);
- oracle_retention[domain]: the same with only public and the domain's own expert routable (what the
  merged shared tensors keep; the rest of the gap is routing);
- chat_regression: public-chat accuracy of the post-trained anchor minus the merge's, in points;
- merged_sequence: the same for the merged model in flexmoe's runtime with sequence routing (the prompt
  picks public or one owner, whose own shared tensors its positions use: ``flexmoe.owner_tensors``;
  the choice by the owners' and the anchor's prompt centroids: ``flexmoe.prompt_centroids``);
  its oracle_retention routes by hand the same way;
- optout_bit_identical: removing an owner from the merged model gives the tensors of a composition
  that never had it, byte for byte.

Every step's output stays under ``workdir/post`` and is reused when present (resumable).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from flexmoe.anchor import load_anchor, pretrain
from flexmoe.anchor_sft import sft_anchor
from flexmoe.chat import chat_splits, generate, reply_text, well_formed
from flexmoe.chat_data import build_chat_sets, correct, read_tasks
from flexmoe.compose import MODEL_KIND, ComposeSettings, compose, remove
from flexmoe.corpora import build_demo_corpora
from flexmoe.demo import DemoKeys, Steps
from flexmoe.errors import FlexmoeError
from flexmoe.evaluate.metrics import wilson
from flexmoe.evaluate.report import plot_post_training
from flexmoe.expert.package import signed_package
from flexmoe.expert.stages import expert_model, settings_for, train_stage
from flexmoe.fileio import read_json, write_json
from flexmoe.router.calibrate import calibrator
from flexmoe.router.train import train_router
from flexmoe.runtime import default_device, from_pretrained
from flexmoe.signing import Trust, sign_dir
from flexmoe.tokenizer import load_tokenizer

OWNERS = ("code", "math", "legal")
# SFT recipes per owner: FlexOlmo's (shared frozen), ours (progressive, embedding / LM-head rows of the
# owner's own tokens only) and BAR's (progressive, every row).
RECIPES = {
    "frozen": {"freeze_shared": True},
    "progressive": {"shared_rows": "owner"},
    "bar": {"shared_rows": "all"},
}
# The merged models: key -> (the recipe whose experts it merges, the shared merge). "merged" is the one
# the report's ``merged`` block describes; the router options start from it (ours).
MERGED = {
    "merged": ("progressive", "disjoint"),
    "merged_mean": ("progressive", "mean"),
    "merged_bar": ("bar", "mean"),
    "merged_bar_ties": ("bar", "ties"),
    "merged_frozen": ("frozen", "disjoint"),  # no shared deltas: the merge does not matter
}


@dataclass(frozen=True)
class PostTrainPreset:
    anchor_steps: int  # only when the workdir has no anchor yet (the main demo's is reused)
    chat_train: int
    chat_tasks: int
    anchor_sft_steps: int
    expert_sft_steps: int
    seq_len: int = 128
    batch_size: int = 8
    anchor_lr: float = 1e-3
    expert_lr: float = 1e-3
    router_steps: int = 30
    max_new_tokens: int = 24
    size_mb: float = 2.0  # demo corpora (only when the workdir has none yet)
    anchor_preset: str = "tiny"  # the anchor's shape (flexmoe.anchor presets), when pretrained here


PRESETS = {
    "tiny": PostTrainPreset(300, 400, 60, 150, 80),
    # A GPU preset: the small anchor shape (hidden 512, 8 layers), so that owners' tasks can be learned.
    "small": PostTrainPreset(
        200, 2000, 200, 200, 150, seq_len=256, batch_size=32, anchor_preset="small", size_mb=5.0
    ),
    "test": PostTrainPreset(
        10, 60, 6, 3, 2, seq_len=64, batch_size=4, router_steps=2, max_new_tokens=6, size_mb=0.3
    ),
}


def _once(path: Path, runner, label: str, fn, *args, **kwargs) -> Path:
    """Run ``fn`` (timed by ``runner``) unless its output ``path`` exists already."""
    if not path.exists():
        runner.run(label, fn, *args, **kwargs)
    return path


def base_anchor(workdir: Path, p: PostTrainPreset, steps, quiet: bool) -> Path:
    """The demo's pretrained anchor: the main demo's if present, else pretrained here."""
    data = _once(workdir / "data", steps, "corpora", build_demo_corpora, workdir / "data", size_mb=p.size_mb)
    return _once(
        workdir / "anchor",
        steps,
        "anchor",
        pretrain,
        data / "public",
        workdir / "anchor",
        p.anchor_preset,
        steps=p.anchor_steps,
        quiet=quiet,
        embedder=None,
    )


def train_all(workdir: Path, p: PostTrainPreset, steps, quiet: bool) -> dict[str, Path]:
    """Anchor SFT, then per owner a frozen and a progressive SFT package."""
    post = workdir / "post"
    chat = _once(
        post / "chat", steps, "chat sets", build_chat_sets, post / "chat", p.chat_train, p.chat_tasks
    )
    anchor = base_anchor(workdir, p, steps, quiet)
    a_sft = _once(
        post / "anchor-sft",
        steps,
        "anchor sft",
        sft_anchor,
        anchor,
        chat / "public",
        post / "anchor-sft",
        steps=p.anchor_sft_steps,
        batch_size=p.batch_size,
        seq_len=p.seq_len,
        lr=p.anchor_lr,
        quiet=quiet,
    )
    out = {"anchor": a_sft, "chat": chat}
    for d in OWNERS:
        for recipe, how in RECIPES.items():
            s = settings_for(
                "sft",
                steps=p.expert_sft_steps,
                batch_size=p.batch_size,
                seq_len=p.seq_len,
                lr=p.expert_lr,
                **how,
            )
            package = _once(
                post / "experts" / f"{d}-{recipe}",
                steps,
                f"sft {d} ({recipe})",
                train_stage,
                a_sft,
                chat / d,
                d,
                post / "experts" / f"{d}-{recipe}",
                s,
                public=chat / "public",
                quiet=quiet,
            )
            out[f"{d}-{recipe}"] = signed_package(package, DemoKeys(workdir).owner(d))
    return out


def shared_sample(chat: Path, out: Path, fraction: float = 0.05, minimum: int = 20) -> Path:
    """BAR's router data: a stratified sample of EVERY owner's chat data (and public chat), rendered
    as text. Needs data from every owner, which a federation that shares nothing cannot provide."""
    tok = load_tokenizer(out.parent / "anchor-sft")
    rows = {"train": [], "valid": []}
    for d in ("public", *OWNERS):
        train, valid = chat_splits(chat / d)
        k = max(minimum, round(fraction * len(train)))
        rows["train"] += [{"text": tok.apply_chat_template(c, tokenize=False)} for c in train[:k]]
        rows["valid"] += [{"text": tok.apply_chat_template(c, tokenize=False)} for c in valid[:4]]
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for split, rs in rows.items():
        (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    tmp.rename(out)
    return out


def public_chat_text(chat: Path, out: Path) -> Path:
    """Public chat rendered as text: the private router option calibrates on public data only."""
    tok = load_tokenizer(out.parent / "anchor-sft")
    train, valid = chat_splits(chat / "public")
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for split, cs in (("train", train), ("valid", valid)):
        (tmp / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": tok.apply_chat_template(c, tokenize=False)}) + "\n" for c in cs)
        )
    tmp.rename(out)
    return out


def compose_all(workdir: Path, pk: dict, p: PostTrainPreset, steps, quiet: bool) -> dict[str, Path]:
    """Merged models (``MERGED``), the two router options, and the opt-out pair; the
    maintainer composes the owners' signed packages and signs every model."""
    m, a = workdir / "post" / "models", pk["anchor"]
    prov = DemoKeys(workdir).provenance()
    out = {
        k: _once(
            m / k,
            steps,
            f"compose ({recipe}, {merge})",
            compose,
            a,
            [pk[f"{d}-{recipe}"] for d in OWNERS],
            m / k,
            ComposeSettings(shared_merge=merge),
            provenance=prov,
        )
        for k, (recipe, merge) in MERGED.items()
    }
    out |= router_options(workdir, pk, out["merged"], p, steps, quiet)
    _once(
        m / "optout_removed",
        steps,
        "opt-out (remove math)",
        remove,
        out["merged"],
        "math",
        m / "optout_removed",
        provenance=prov,
    )
    never = [pk["code-progressive"], pk["legal-progressive"]]
    _once(
        m / "optout_never",
        steps,
        "compose without math",
        compose,
        a,
        never,
        m / "optout_never",
        provenance=prov,
    )
    return out


def router_options(workdir: Path, pk: dict, merged: Path, p: PostTrainPreset, steps, quiet: bool) -> dict:
    """BAR's router trained on a sample of every owner's data, and the private option: calibration on
    public chat only."""
    m, a = workdir / "post" / "models", pk["anchor"]
    prog = [pk[f"{d}-progressive"] for d in OWNERS]
    prov = DemoKeys(workdir).provenance()
    out = {}
    sample = workdir / "post" / "router-sample"
    if not sample.exists():
        shared_sample(pk["chat"], sample)
    if not (m / "router_shared").exists():
        steps.run(
            "router (shared sample)",
            train_router,
            merged,
            [],
            [sample],
            m / "router_shared",
            steps=p.router_steps,
            batch_size=p.batch_size,
            seq_len=p.seq_len,
            quiet=quiet,
        )
        meta = read_json(m / "router_shared" / "flexmoe.json")
        meta["router_training"]["needs_data_from_every_owner"] = True
        meta["router_training"]["data_note"] = (
            "BAR router stage: a stratified sample of every owner's chat data"
        )
        write_json(m / "router_shared" / "flexmoe.json", meta)
        sign_dir(m / "router_shared", prov.sign_key, MODEL_KIND)  # after the note: it signs that too
    out["router_shared"] = m / "router_shared"
    pub_text = workdir / "post" / "public-chat-text"
    if not pub_text.exists():
        public_chat_text(pk["chat"], pub_text)
    out["router_private"] = _once(
        m / "router_private",
        steps,
        "router (private: calibrated on public chat)",
        compose,
        a,
        prog,
        m / "router_private",
        ComposeSettings(calibrate=calibrator([pub_text])),
        provenance=prov,
    )
    return out


def same_tensors(a: Path, b: Path) -> bool:
    """Every tensor of two model directories equal byte for byte (names, dtypes, shapes, bytes)."""

    def load(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as sf:
                out.update({f"{f.name}:{k}": sf.get_tensor(k) for k in sf.keys()})
        return out

    x, y = load(a), load(b)
    return x.keys() == y.keys() and all(
        x[k].dtype == y[k].dtype
        and x[k].shape == y[k].shape
        and x[k].numpy().tobytes() == y[k].numpy().tobytes()
        for k in x
    )


# --------------------------------------------------------------------------------------------------
# Evaluation


def evaluate_chat(model, tok, chat: Path, domains, max_new_tokens: int, batch: int = 32) -> dict:
    """Per domain: task accuracy (with its 95% Wilson interval and item count) and the well-formed
    share of the generated turns (greedy)."""
    out = {}
    for d in domains:
        tasks = read_tasks(chat / d / "tasks.jsonl")
        replies = []
        for i in range(0, len(tasks), batch):
            replies += generate(model, tok, [t["messages"] for t in tasks[i : i + batch]], max_new_tokens)
        ok = [
            correct(reply_text(tok, r), t["answer"], t["check"]) for t, r in zip(tasks, replies, strict=True)
        ]
        wf = [well_formed(tok, r) for r in replies]
        out[d] = {
            "accuracy": sum(ok) / len(ok),
            "accuracy_ci": wilson(sum(ok), len(ok)),
            "well_formed": sum(wf) / len(wf),
            "well_formed_count": [sum(wf), len(wf)],
            "n": len(tasks),
            "example": reply_text(tok, replies[0]),
        }
    return out


def load_for_eval(
    kind: str, path: Path, anchor: Path, trust: Trust | None = None, include=None, sequence: bool = False
):
    """(model, tokenizer) of the post-trained anchor, an expert package (as its owner trained it: full
    shared deltas, 2 experts) or a composed model (its signature verified under ``trust``; ``include``:
    only these owners' experts routable, besides public; ``sequence``: sequence-routed, the prompt
    choosing the owner)."""

    device = default_device()  # generation on the GPU when there is one
    if kind == "anchor":
        return load_anchor(path, torch.float32).to(device).eval(), load_tokenizer(path)
    if kind == "expert":
        return expert_model(anchor, path)[0].to(device).eval(), load_tokenizer(anchor)
    c = from_pretrained(path, trust=trust, include=include, sequence_routing=sequence)
    return c.model, c.tokenizer


def evaluate_everything(pk: dict, models: dict, p: PostTrainPreset, steps, trust: Trust) -> dict:
    """Chat scores of every model; composed ones load as a model user's would (``trust``)."""
    chat, anchor, n = pk["chat"], pk["anchor"], p.max_new_tokens
    res = {}

    def run(key, kind, path, domains, include=None, sequence=False):
        model, tok = load_for_eval(kind, path, anchor, trust, include, sequence)
        res[key] = steps.run(f"evaluate {key}", evaluate_chat, model, tok, chat, domains, n)

    run("anchor_sft", "anchor", anchor, ("public", *OWNERS))
    for d in OWNERS:
        for recipe in RECIPES:
            run(f"{d}-{recipe}", "expert", pk[f"{d}-{recipe}"], (d, "public"))
    for key, path in models.items():
        run(key, "composed", path, ("public", *OWNERS))
    # the merged model sequence-routed (flexmoe's runtime): the prompt picks at most one owner, whose
    # own shared tensors its positions then use
    run("merged_sequence", "composed", models["merged"], ("public", *OWNERS), sequence=True)
    for d in OWNERS:  # oracle routing: only public and the domain's own expert routable
        run(f"oracle-{d}", "composed", models["merged"], (d,), include=[d])
        run(f"oracle_sequence-{d}", "composed", models["merged"], (d,), include=[d], sequence=True)
    return res


def summarise(res: dict, optout: bool) -> dict:
    """The ``post_training`` block of report.json (the issue's schema)."""
    base = res["anchor_sft"]

    def recipe(r: str) -> dict:
        turns = [res[f"{d}-{r}"][x]["well_formed_count"] for d in OWNERS for x in (d, "public")]
        return {
            "well_formed": sum(t[0] for t in turns) / sum(t[1] for t in turns),
            "task_gain": {d: res[f"{d}-{r}"][d]["accuracy"] - base[d]["accuracy"] for d in OWNERS},
        }

    block = {r: recipe(r) for r in RECIPES}

    def kept(acc: dict, r: str) -> dict:
        """Each domain's gain over the anchor in ``acc`` as a share of recipe ``r``'s expert gain."""
        out = {}
        for d in OWNERS:
            gain = block[r]["task_gain"][d]
            out[d] = (acc[d] - base[d]["accuracy"]) / gain if gain > 0 else None
        return out

    def merged(key: str) -> dict:
        r = MERGED[key][0] if key in MERGED else "progressive"  # the router options start from "merged"
        reg = 100 * (base["public"]["accuracy"] - res[key]["public"]["accuracy"])
        acc = {d: res[key][d]["accuracy"] for d in OWNERS}
        return {"retention": kept(acc, r), "chat_regression": reg, "experts": r}

    block["merged"] = merged("merged")
    oracle = {d: res[f"oracle-{d}"][d]["accuracy"] for d in OWNERS}
    block["merged"]["oracle_retention"] = kept(oracle, "progressive")
    if "merged_sequence" in res:  # flexmoe's runtime: sequence routing with the owners' own tensors
        block["merged_sequence"] = merged("merged_sequence")
        oracle = {d: res[f"oracle_sequence-{d}"][d]["accuracy"] for d in OWNERS}
        block["merged_sequence"]["oracle_retention"] = kept(oracle, "progressive")
    block["optout_bit_identical"] = optout
    variants = {k: merged(k) for k in res if k.startswith(("merged_", "router_"))}
    return {"post_training": block, "variants": variants}


def run_post_train_demo(workdir: Path, preset: str = "tiny", *, quiet: bool = False) -> dict:
    """Run (or continue) the post-training demo; writes the ``post_training`` block into
    ``workdir/report.json`` (kept beside the main demo's report when there is one) and the task
    accuracies as ``workdir/post_training.png``."""

    if preset not in PRESETS:
        raise FlexmoeError(f"Unknown demo preset {preset!r}.", f"use one of {', '.join(PRESETS)}.")
    p, workdir, steps = PRESETS[preset], Path(workdir), Steps(quiet)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pk = train_all(workdir, p, steps, quiet)
    models = compose_all(workdir, pk, p, steps, quiet)
    m = workdir / "post" / "models"
    optout = same_tensors(m / "optout_removed", m / "optout_never")
    res = evaluate_everything(pk, models, p, steps, DemoKeys(workdir).model_trust())
    summary = summarise(res, optout)
    details = {
        "preset": preset,
        "evaluations": res,
        "merge_variants": summary["variants"],
        "router_shared_needs_data_from_every_owner": True,
        "seconds": {**steps.seconds, "total": time.perf_counter() - t0},
        "definitions": __doc__.split("Measured on", 1)[1].split("Every step", 1)[0].strip(),
    }
    report = read_json(workdir / "report.json") if (workdir / "report.json").is_file() else {}
    report["post_training"] = summary["post_training"]
    report["post_training_details"] = details
    write_json(workdir / "report.json", report)
    plot_post_training(res, workdir / "post_training.png")
    shutil.rmtree(workdir / "post" / ".tmp", ignore_errors=True)
    return report
