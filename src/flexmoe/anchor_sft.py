"""Post-train the anchor for chat (``flexmoe anchor train --stage sft``): add the chat template and its
special tokens to the anchor's tokenizer, grow the embeddings and LM head (new rows at the mean
embedding), and fine-tune the whole dense model on public chat data with the loss on assistant tokens
only. The result is a new anchor (new fingerprint) that owners train their experts against; its
tokenizer files, chat template included, travel into every composed model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from flexmoe.anchor import ANCHOR_META, fingerprint, load_anchor, publish_router_init, resolve
from flexmoe.chat import add_chat_template, chat_rows, chat_splits
from flexmoe.data import data_fingerprint
from flexmoe.errors import FlexmoeError
from flexmoe.fileio import atomic_dir, read_json, write_json
from flexmoe.prompt_centroids import FIELD, centroid_record
from flexmoe.tokenizer import load_tokenizer
from flexmoe.training import (
    RunOptions,
    Stage,
    TrainConfig,
    claim_work_dir,
    clear_checkpoint,
    init_distributed,
    train,
)


@dataclass
class AnchorSFTSettings:
    """Chat SFT of the anchor: the whole dense model trains, loss on assistant tokens only."""

    steps: int = 150
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 1e-3
    seed: int = 0
    resume: bool = False
    force: bool = False
    quiet: bool = False
    embedder: str | None = None

    def train_config(self) -> TrainConfig:
        """BAR's SFT schedule: short warmup, then linear to zero."""
        return TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            lr=self.lr,
            schedule="linear",
            warmup_steps=max(1, round(0.03 * self.steps)),
            eval_every=max(1, self.steps // 4),
            eval_batches=4,
            checkpoint_every=max(1, self.steps // 5),
            log_every=max(1, self.steps // 10),
            seed=self.seed,
        )


def sft_anchor(
    anchor: str | Path, chat: Path, out: Path, settings: AnchorSFTSettings | None = None, **overrides
) -> dict:
    """Chat-tune ``anchor`` on the conversations in ``chat``; write the post-trained anchor to ``out``.
    ``overrides``: fields of ``AnchorSFTSettings`` (e.g. ``steps=3``)."""
    s = replace(settings or AnchorSFTSettings(), **overrides)
    out = Path(out)
    work = claim_work_dir(out, s.resume, s.force)
    base = resolve(anchor)
    train_convs, valid_convs = chat_splits(chat)
    torch.manual_seed(s.seed)
    device = init_distributed()  # the GPU when there is one
    model = load_anchor(base, torch.float32)
    tok = load_tokenizer(base)
    added = add_chat_template(tok, model)
    if s.seq_len > model.config.max_position_embeddings:
        raise FlexmoeError(
            f"--seq-len {s.seq_len} exceeds the anchor's limit.",
            f"use at most {model.config.max_position_embeddings}.",
        )
    valid = chat_rows(valid_convs, tok, s.seq_len)
    stage = Stage(chat_rows(train_convs, tok, s.seq_len), (valid.ids, valid.labels), desc="anchor sft")
    cfg = s.train_config()
    model.to(device)  # after the chat tokens' rows were added
    run = RunOptions(checkpoint_dir=work / "checkpoint", resume=s.resume, quiet=s.quiet, device=device)
    result = train(model, cfg, stage, run)
    if result.final_valid_loss is None:
        return {"finished": False}
    rendered = [tok.apply_chat_template(c, tokenize=False) for c in train_convs]
    summary = {
        "finished": True,
        "stage": "sft",
        "base_anchor": {"path": str(base), "fingerprint": fingerprint(base)},
        "base_training": read_json(base / ANCHOR_META) if (base / ANCHOR_META).is_file() else None,
        "chat_tokens_added": added,
        "data": {"fingerprint": data_fingerprint(rendered), "conversations": len(train_convs)},
        "train_config": asdict(cfg),
        "valid_loss": {"before": result.initial_valid_loss, "after": result.final_valid_loss},
        "valid_perplexity": math.exp(result.final_valid_loss),
        "tokens_seen": result.tokens_seen,
        "seconds": result.seconds,
        "history": result.history,
        # the public class of a chat prompt's owner choice (flexmoe.prompt_centroids)
        FIELD: centroid_record(model, tok, train_convs),
    }
    _write_anchor(out, model, tok, summary, rendered, s)
    clear_checkpoint(work)
    summary["fingerprint"] = fingerprint(out)
    return summary


def _write_anchor(out: Path, model, tok, summary: dict, rendered: list[str], s: AnchorSFTSettings) -> None:
    model.config.vocab_size = len(tok)
    with atomic_dir(out, force=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        write_json(tmp / ANCHOR_META, summary)
        # The router init is republished: owners' public row comes from this anchor's hidden states.
        publish_router_init(tmp, model, tok, rendered, embedder=s.embedder, seq_len=s.seq_len, n_docs=200)
