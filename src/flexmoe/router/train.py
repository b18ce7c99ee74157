"""Maintainer side: router training (FlexOlmo's optional "RT" step) on public proxy sets.

After composition, only the router rows are trained, with the ordinary next-token loss through the
mixture, on the owners' proxy sets (public documents each owner picked as resembling its private
data, ``flexmoe expert proxy``) mixed with public data. Every expert FFN and every shared tensor stays
frozen; the output is written by the same streaming writer as ``compose``, reading those tensors from
the input checkpoint, so they are bit-identical by construction (and checked).

The learned biases are not trained: the Hugging Face format has no slot for them, and training what
stock transformers computes keeps the result loadable with the same logits. They are carried over
unchanged in ``flexmoe_bias.safetensors``.

Opt-out after router training: ``flexmoe remove`` still deletes the owner's FFN and router row, so no
parameter trained on that owner's private data remains. The other owners' rows, however, were trained
while that expert was present and on a mixture that included its proxy set (public text chosen by its
classifier); they are kept as they are, not retrained. ``flexmoe.json`` keeps the router-training
record, including the experts present at the time, next to the removal in its history.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from flexmoe.checkpoint import DEFAULT_SHARD_BYTES
from flexmoe.errors import FlexmoeError

VALID_BLOCKS = 16  # validation only reports progress; a fixed small set keeps it cheap
DEFAULTS = {"steps": 40, "batch_size": 8, "lr": 2e-3, "weight_decay": 0.1, "warmup_steps": 4}


def router_parameters(model) -> list[torch.nn.Parameter]:
    """The owners' router rows of every MoE block, in layer and expert order.

    The public row stays as published: it is the fixed point every owner trained against, and an owner
    who joins later must share it (``flexmoe add`` checks that)."""
    from flexmoe.moe import moe_blocks

    return [row.weight for block in moe_blocks(model) for row in block.router[1:]]


def freeze_all_but_router_rows(model) -> list[torch.nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(False)
    rows = router_parameters(model)
    for p in rows:
        p.requires_grad_(True)
    return rows


def frozen_digest(model) -> dict[str, torch.Tensor]:
    """Copies of every frozen tensor, to prove afterwards that training did not touch them."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def check_frozen(model, before: dict[str, torch.Tensor]) -> None:
    after = dict(model.named_parameters())
    changed = [n for n, t in before.items() if not torch.equal(after[n].detach(), t)]
    if changed:
        raise FlexmoeError(
            f"Frozen tensors changed during router training ({', '.join(changed[:3])}...).",
            "this is a bug in flexmoe; please report it with the command you ran.",
        )


def training_blocks(
    proxy_docs: list[str], public: list[Path], tokenizer, seq_len: int, proxy_share: float
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Training and validation blocks: proxy text making up ``proxy_share`` of the training blocks,
    the rest public; validation = the public corpus's held-out split."""
    from flexmoe.data import blocks_for, data_fingerprint, load_splits
    from flexmoe.expert.train import mixed_public_blocks

    pub = load_splits(public)
    pub_train = blocks_for(pub.train, tokenizer, seq_len)
    valid = blocks_for(pub.valid, tokenizer, seq_len)[:VALID_BLOCKS]
    info = {"public_fingerprint": data_fingerprint(pub.train), "public_blocks": len(pub_train)}
    if not proxy_docs:
        return pub_train, valid, {**info, "proxy_blocks": 0}
    proxy = blocks_for(proxy_docs, tokenizer, seq_len)
    # The same helper the owners use to mix public data in: public blocks making up 1 - share.
    public_part = mixed_public_blocks(pub_train, len(proxy), 1 - proxy_share)
    return torch.cat([proxy, public_part]), valid, {**info, "proxy_blocks": len(proxy)}


def train_router(
    model: Path,
    proxies: list[Path],
    public: list[Path],
    out: Path,
    *,
    steps: int = DEFAULTS["steps"],
    batch_size: int = DEFAULTS["batch_size"],
    seq_len: int | None = None,
    lr: float = DEFAULTS["lr"],
    weight_decay: float = DEFAULTS["weight_decay"],
    proxy_share: float = 0.5,
    z_loss: float = 1e-3,
    seed: int = 0,
    resume: bool = False,
    force: bool = False,
    quiet: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict:
    """Train the router rows of composed ``model`` on proxy sets + public data; write ``out``.

    Returns the new ``flexmoe.json``.
    """
    from flexmoe.compose import _current, _event, _rewrite, load_meta
    from flexmoe.fileio import check_output_dir
    from flexmoe.moe import moe_blocks, router_z_loss
    from flexmoe.router.calibrate import trained_public_row
    from flexmoe.router.proxy import load_proxy
    from flexmoe.runtime import from_pretrained
    from flexmoe.training import TrainConfig, clear_checkpoint, init_distributed, is_main, lm_loss, train

    model, out = Path(model), Path(out)
    if out.resolve() == model.resolve():
        raise FlexmoeError(
            "--out is the input model.", "write to a new directory; the input stays untouched."
        )
    if not public:
        raise FlexmoeError("No public data given.", "pass --public PATH (the public corpus).")
    if not 0.0 <= proxy_share < 1.0:
        raise FlexmoeError(f"--proxy-share {proxy_share} is not in [0, 1).", "use e.g. 0.5.")
    work = out.parent / f".{out.name}.work"
    if not resume:
        check_output_dir(out, force)
        if force:
            clear_checkpoint(work)
    meta = load_meta(model)
    records, docs = [], []
    for p in proxies:
        rec, d = load_proxy(p)
        records.append(
            {k: rec.get(k) for k in ("name", "count", "public_fingerprint", "method", "classifier")}
        )
        records[-1]["sha256"] = rec["files"]["proxy.jsonl"]
        docs += d
    if proxies and not docs:
        raise FlexmoeError("The proxy sets hold no documents.", "re-run 'flexmoe expert proxy'.")

    device = init_distributed()
    torch.manual_seed(seed)
    composed = from_pretrained(model, use_bias=False, device=device)
    net = composed.model
    # A calibration holds only for the rows it was solved for: train from the rows as trained.
    trained_public = trained_public_row(model)
    if trained_public is not None:
        with torch.no_grad():
            for i, block in enumerate(moe_blocks(net)):
                block.router[0].weight.copy_(trained_public(i).view(1, -1))
    seq_len = seq_len or _training_seq_len(meta)
    train_blocks, valid_blocks, data_info = training_blocks(
        docs, public, composed.tokenizer, seq_len, proxy_share if docs else 0.0
    )
    rows = freeze_all_but_router_rows(net)
    before = frozen_digest(net)
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        warmup_steps=min(DEFAULTS["warmup_steps"], max(1, steps // 10)),
        weight_decay=weight_decay,
        eval_every=max(1, steps // 2),
        eval_batches=4,
        checkpoint_every=max(1, steps // 4),
        log_every=max(1, steps // 10),
        seed=seed,
    )

    def loss_fn(m, batch):
        return lm_loss(m, batch) + z_loss * router_z_loss(net).to(batch.device)

    t0 = time.perf_counter()
    result = train(
        net,
        train_blocks,
        valid_blocks,
        cfg,
        param_groups=[{"params": rows}],
        loss_fn=loss_fn,
        checkpoint_dir=work / "checkpoint",
        resume=resume,
        desc="router",
        quiet=quiet,
        device=device,
    )
    check_frozen(net, before)
    layers = [[row.weight.detach().view(-1).cpu() for row in block.router] for block in moe_blocks(net)]
    names = composed.names
    _, meta, experts = _current(model)
    if [e.name for e in experts] != names:
        raise FlexmoeError(f"{model} changed during router training.", "run it again.")
    # The public row did not train: keep it exactly as the checkpoint holds it (before calibration).
    # A model composed with another routing method trained from its routed rows: those are now the
    # trained rows (public row included), and the result is routed as "trained".
    routed = meta.get("routing", {}).get("method", "trained") != "trained"
    trained = [
        replace(ex, row=lambda i, e=e: layers[i][e]) for e, ex in enumerate(experts) if e or routed
    ]
    if not routed:
        trained = experts[:1] + trained
    record = {
        "method": "proxy-lm: next-token loss through the mixture, router rows only (FlexOlmo RT)",
        "experts": names,
        "proxies": records,
        "data": {**data_info, "proxy_share": proxy_share if docs else 0.0},
        "config": {**asdict(cfg), "z_loss": z_loss},
        "tokens_seen": result.tokens_seen,
        "valid_loss": {"before": result.initial_valid_loss, "after": result.final_valid_loss},
        "seconds": time.perf_counter() - t0,
        "trainable": "the owners' router rows; the public row, biases, experts and shared weights frozen",
    }
    event = _event("router-train", proxies=[r["name"] for r in records], steps=steps)
    if not is_main():
        return {}
    # The output was checked to be free above (or --force/--resume given): replace it atomically.
    new = _rewrite(
        model, out, trained, {**meta, "router_training": record}, event, None, True, max_shard_bytes,
        routing="trained",
    )
    clear_checkpoint(work)
    return new


def _training_seq_len(meta: dict, default: int = 256) -> int:
    """The sequence length the owners trained with (the longest, if they differ)."""
    lens = [e["manifest"].get("training", {}).get("seq_len") for e in meta["experts"][1:]]
    return max([x for x in lens if x] or [default])
