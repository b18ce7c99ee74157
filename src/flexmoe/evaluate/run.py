"""Evaluate one model on the demo data: per-domain perplexity on the test splits and every task."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from flexmoe.compose import FLEXMOE_JSON
from flexmoe.data import read_documents
from flexmoe.errors import FlexmoeError
from flexmoe.evaluate.metrics import HFLM, exact_match, multiple_choice, perplexity
from flexmoe.evaluate.tasks import load_tasks
from flexmoe.fileio import read_json
from flexmoe.runtime import from_pretrained
from flexmoe.tokenizer import load_tokenizer

DOMAINS = ("public", "code", "math", "legal")
HEADLINE = {"cloze": "acc_norm", "answer": "exact_match"}  # the one number per task that averages


def evaluate_lm(
    lm,
    data_dir: Path,
    *,
    seq_len: int = 256,
    max_blocks: int | None = 64,
    max_items: int | None = None,
    progress=None,
    domains: Sequence[str] = DOMAINS,
    only_tasks: Sequence[str] | None = None,
) -> dict:
    """Scores of one model: ``{"perplexity": {domain: float}, "tasks": {task: float}, "average": float,
    "details": {...}}``; task scores and the average are percentages. ``domains`` and ``only_tasks``
    narrow what is scored (default: every demo domain and task present)."""
    data_dir = Path(data_dir)
    domains = [d for d in domains if (data_dir / d / "test.jsonl").is_file()]
    ppl, tasks, details = {}, {}, {"perplexity": {}, "tasks": {}}
    for d in domains:
        r = perplexity(lm, read_documents([data_dir / d / "test.jsonl"]), seq_len, max_blocks=max_blocks)
        ppl[d] = r["perplexity"]
        details["perplexity"][d] = r
        if progress:
            progress(f"perplexity {d} {r['perplexity']:.2f}")
    for name, items in load_tasks(data_dir).items():
        if only_tasks is not None and name not in only_tasks:
            continue
        items = items[:max_items] if max_items else items
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
    return {
        "perplexity": ppl,
        "tasks": tasks,
        "average": sum(tasks.values()) / max(1, len(tasks)),
        "details": details,
    }


def load_lm(
    model: Path,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    use_bias: bool = False,
    device: str | None = None,
):
    """An ``HFLM`` for a flexmoe composed model (with expert choice) or any HF causal LM directory."""
    model = Path(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")  # the GPU when there is one
    if (model / FLEXMOE_JSON).is_file():
        c = from_pretrained(model, include=include, exclude=exclude, use_bias=use_bias, device=device)
        return HFLM(c.model, c.tokenizer)
    if include or exclude:
        raise FlexmoeError(
            f"{model} is not a flexmoe model; --include/--exclude need one.", "drop those options."
        )


    return HFLM(AutoModelForCausalLM.from_pretrained(str(model)).to(device), load_tokenizer(model))


def seq_len_of(model: Path, default: int = 256) -> int:
    """Evaluate at the sequence length the model was trained with, when it says so."""
    for name in ("flexmoe_anchor.json",):
        if (Path(model) / name).is_file():
            return read_json(Path(model) / name).get("train_config", {}).get("seq_len", default)
    return default
