"""Evaluate one model on the demo data: per-domain perplexity on the test splits and every task."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from flexmoe.compose import FLEXMOE_JSON
from flexmoe.data import SUFFIXES, read_documents
from flexmoe.errors import FlexmoeError
from flexmoe.evaluate.baselines import UPCYCLED, load_upcycled
from flexmoe.evaluate.metrics import HFLM, exact_match, multiple_choice, perplexity
from flexmoe.evaluate.tasks import load_tasks
from flexmoe.fileio import read_json
from flexmoe.moe import routing as moe_routing
from flexmoe.runtime import from_pretrained
from flexmoe.sequence_routing import SequenceRouting
from flexmoe.signing import Trust
from flexmoe.tokenizer import load_tokenizer

DOMAINS = ("public", "code", "math", "legal")
HEADLINE = {"cloze": "acc_norm", "answer": "exact_match"}  # the one number per task that averages


def test_files(folder: Path) -> list[Path]:
    """The test split of one domain folder (``test.jsonl``, ``test.txt`` or ``test.parquet``)."""
    return [folder / f"test{s}" for s in SUFFIXES if (folder / f"test{s}").is_file()]


def find_domains(data: Path) -> dict[str, list[Path]]:
    """What a data path offers for perplexity, by domain name: a single file is one domain (its
    stem); a folder with a test split is one domain; otherwise every sub-folder with a test split is
    one (``public`` first, then by name)."""
    data = Path(data)
    if data.is_file():
        if data.suffix not in SUFFIXES:
            raise FlexmoeError(f"{data} has unsupported type {data.suffix!r}.", f"use {', '.join(SUFFIXES)}.")
        return {data.stem: [data]}
    if not data.is_dir():
        raise FlexmoeError(f"{data} does not exist.", "pass a data directory or a .jsonl/.txt/.parquet file.")
    if test_files(data):
        return {data.name: test_files(data)}
    found = {p.name: test_files(p) for p in sorted(data.iterdir()) if p.is_dir() and test_files(p)}
    return dict(sorted(found.items(), key=lambda kv: kv[0] != "public"))


def test_documents(data: Path, domain: str) -> list[str]:
    """The test documents of one domain of a data path (see ``find_domains``)."""
    files = find_domains(data).get(domain)
    if not files:
        raise FlexmoeError(
            f"{data} has no test split for domain {domain!r}.",
            f"add {Path(data) / domain / 'test.jsonl'} or choose from {', '.join(find_domains(data))}.",
        )
    return read_documents(files)


@dataclass(frozen=True)
class EvalSettings:
    """What ``evaluate_lm`` scores, and how much of it."""

    seq_len: int = 256  # tokens per perplexity block
    max_blocks: int | None = 64  # perplexity blocks per domain; None: all
    max_items: int | None = None  # items per task; None: all
    max_docs: int | None = None  # test documents per domain; None: all
    domains: Sequence[str] | None = None  # the perplexity domains scored; None: every one found
    only_tasks: Sequence[str] | None = None  # the tasks scored; None: every one found


def evaluate_lm(
    lm, data_dir: Path, settings: EvalSettings | None = None, *, progress=None, **overrides
) -> dict:
    """Scores of one model: ``{"perplexity": {domain: float}, "tasks": {task: float}, "average": float,
    "details": {...}}``; task scores and the average are percentages. ``data_dir`` is a folder of
    domains (each with a test split, optionally ``tasks/``), one domain folder, or one file.
    ``settings`` (or keyword ``overrides`` of its fields) narrow what is scored (default: everything
    found) and limit documents per domain and items per task. Nothing to score is an error."""
    s = replace(settings or EvalSettings(), **overrides)
    domains, only_tasks, max_items = s.domains, s.only_tasks, s.max_items
    found = find_domains(data_dir)
    ppl, tasks, details = {}, {}, {"perplexity": {}, "tasks": {}}
    for d in [d for d in (domains if domains is not None else found) if d in found]:
        docs = read_documents(found[d])[: s.max_docs]
        r = perplexity(lm, docs, s.seq_len, max_blocks=s.max_blocks)
        ppl[d] = r["perplexity"]
        details["perplexity"][d] = r
        if progress:
            progress(f"perplexity {d} {r['perplexity']:.2f} (95% CI {r['ci95'][0]:.2f}-{r['ci95'][1]:.2f})")
    all_tasks = load_tasks(data_dir) if (Path(data_dir) / "tasks").is_dir() else {}
    for name, items in all_tasks.items():
        if only_tasks is not None and name not in only_tasks:
            continue
        items = items[:max_items] if max_items else items
        if not items:
            continue
        if name.endswith("_cloze"):
            s = multiple_choice(lm, items)
            details["tasks"][name] = {k: v.as_dict() for k, v in s.items()}
            tasks[name] = 100 * s["acc_norm"].value
        else:
            s = exact_match(lm, items)
            details["tasks"][name] = {"exact_match": s.as_dict()}
            tasks[name] = 100 * s.value
        if progress:
            progress(f"{name} {tasks[name]:.1f}")
    if not ppl and not tasks:
        raise FlexmoeError(
            f"Nothing to score in {data_dir}: no domain with a test split and no tasks"
            + (f" among {', '.join(domains)}" if domains is not None else "")
            + ".",
            "pass a folder of domains each with test.jsonl/test.txt/test.parquet, one such folder, "
            "or a single .jsonl/.txt/.parquet file.",
        )
    return {
        "perplexity": ppl,
        "tasks": tasks,
        "average": sum(tasks.values()) / len(tasks) if tasks else None,
        "details": details,
    }


def load_lm(
    model: Path,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    use_bias: bool = False,
    device: str | None = None,
    *,
    trust: Trust | None = None,
    sequence_routing: bool | SequenceRouting = False,
):
    """An ``HFLM`` for a flexmoe composed model (with expert choice, optionally sequence-routed: True for
    the defaults, or a ``SequenceRouting`` with its own settings) or any
    HF causal LM directory. A composed model's signature is verified under ``trust`` (as
    ``runtime.from_pretrained``)."""
    model = Path(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")  # the GPU when there is one
    if (model / FLEXMOE_JSON).is_file():
        c = from_pretrained(
            model,
            include=include,
            exclude=exclude,
            use_bias=use_bias,
            device=device,
            trust=trust,
            sequence_routing=sequence_routing,
        )
        # Sequence routing (and the owner tensors that only it loads) chooses from the whole prefix:
        # greedy recomputes it.
        scope = lambda: moe_routing(c.routing())  # noqa: E731
        return HFLM(c.model, c.tokenizer, scope=scope, kv_cache=c.sequence is None)
    if include or exclude or sequence_routing:
        raise FlexmoeError(
            f"{model} is not a flexmoe model; --include/--exclude/--sequence-routing need one.",
            "drop those options.",
        )
    if (model / UPCYCLED).is_file():  # the demo's BTX or unrestricted MoE
        return HFLM(load_upcycled(model, device), load_tokenizer(model), kv_cache=True)
    lm = AutoModelForCausalLM.from_pretrained(str(model)).to(device)
    return HFLM(lm, load_tokenizer(model), kv_cache=True)


def seq_len_of(model: Path, default: int = 256) -> int:
    """Evaluate at the sequence length the model was trained with, when it says so."""
    for name in ("flexmoe_anchor.json",):
        if (Path(model) / name).is_file():
            return read_json(Path(model) / name).get("train_config", {}).get("seq_len", default)
    return default
