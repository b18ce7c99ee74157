"""Post-train the anchor for chat (``flexmoe anchor train --stage sft``): add the chat template and its
special tokens to the anchor's tokenizer, grow the embeddings and LM head (new rows at the mean
embedding), and fine-tune the whole dense model on public chat data with the loss on assistant tokens
only. The result is a new anchor (new fingerprint) that owners train their experts against; its
tokenizer files, chat template included, travel into every composed model.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch

from flexmoe.errors import FlexmoeError


def sft_anchor(
    anchor: str | Path,
    chat: Path,
    out: Path,
    *,
    steps: int = 150,
    batch_size: int = 8,
    seq_len: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    resume: bool = False,
    force: bool = False,
    quiet: bool = False,
    embedder: str | None = None,
) -> dict:
    """Chat-tune ``anchor`` on the conversations in ``chat``; write the post-trained anchor to ``out``."""
    from flexmoe.anchor import ANCHOR_META, fingerprint, load_anchor, publish_router_init, resolve
    from flexmoe.chat import add_chat_template, chat_blocks, chat_loss, chat_splits
    from flexmoe.data import data_fingerprint
    from flexmoe.fileio import atomic_dir, check_output_dir, read_json, write_json
    from flexmoe.tokenizer import load_tokenizer
    from flexmoe.training import TrainConfig, clear_checkpoint, train

    out = Path(out)
    work = out.parent / f".{out.name}.work"
    if not resume:
        check_output_dir(out, force)
        if force:
            clear_checkpoint(work)
    base = resolve(anchor)
    train_convs, valid_convs = chat_splits(chat)
    torch.manual_seed(seed)
    model = load_anchor(base, torch.float32)
    tok = load_tokenizer(base)
    added = add_chat_template(tok, model)
    if seq_len > model.config.max_position_embeddings:
        raise FlexmoeError(
            f"--seq-len {seq_len} exceeds the anchor's limit.",
            f"use at most {model.config.max_position_embeddings}.",
        )
    train_blocks, valid_blocks = (
        chat_blocks(train_convs, tok, seq_len),
        chat_blocks(valid_convs, tok, seq_len),
    )
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        min_lr_ratio=0.0,
        warmup_steps=max(1, round(0.03 * steps)),
        eval_every=max(1, steps // 4),
        eval_batches=4,
        checkpoint_every=max(1, steps // 5),
        log_every=max(1, steps // 10),
        seed=seed,
    )
    result = train(
        model,
        train_blocks,
        valid_blocks,
        cfg,
        loss_fn=chat_loss,
        checkpoint_dir=work / "checkpoint",
        resume=resume,
        desc="anchor sft",
        quiet=quiet,
    )
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
    }
    model.config.vocab_size = len(tok)
    with atomic_dir(out, force=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        write_json(tmp / ANCHOR_META, summary)
        # The router init is republished: owners' public row comes from this anchor's hidden states.
        publish_router_init(tmp, model, tok, rendered, embedder=embedder, seq_len=seq_len, n_docs=200)
    clear_checkpoint(work)
    summary["fingerprint"] = fingerprint(out)
    return summary
