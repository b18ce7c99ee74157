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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from flexmoe.checkpoint import DEFAULT_SHARD_BYTES
from flexmoe.compose import (
    ComposeSettings,
    Provenance,
    _current,
    _event,
    _rewrite,
    trained_public_row,
    training_seq_len,
)
from flexmoe.data import blocks_for, data_fingerprint, load_splits
from flexmoe.errors import FlexmoeError
from flexmoe.expert.train import mixed_public_blocks
from flexmoe.fileio import claims_output
from flexmoe.moe import moe_blocks, router_z_loss
from flexmoe.router.proxy import load_proxy
from flexmoe.runtime import from_pretrained
from flexmoe.signing import ALLOW_UNSIGNED
from flexmoe.training import (
    LMStep,
    PackedBlocks,
    RunOptions,
    Stage,
    TrainConfig,
    claim_work_dir,
    clear_checkpoint,
    init_distributed,
    is_main,
    lm_loss,
    only,
    train,
)

VALID_BLOCKS = 16  # validation only reports progress; a fixed small set keeps it cheap
DEFAULTS = {"steps": 40, "batch_size": 8, "lr": 2e-3, "weight_decay": 0.1, "warmup_steps": 4}


@dataclass
class RouterTrainSettings:
    """``flexmoe router train``'s settings besides its paths (recorded in ``flexmoe.json``)."""

    steps: int = DEFAULTS["steps"]
    batch_size: int = DEFAULTS["batch_size"]
    seq_len: int | None = None  # None: the owners' training length
    lr: float = DEFAULTS["lr"]
    weight_decay: float = DEFAULTS["weight_decay"]
    proxy_share: float = 0.5
    z_loss: float = 1e-3
    seed: int = 0
    compile: bool | None = None  # per-decoder-layer torch.compile; None: on CUDA only
    resume: bool = False
    force: bool = False
    quiet: bool = False
    max_shard_bytes: int = DEFAULT_SHARD_BYTES


def router_parameters(model) -> list[torch.nn.Parameter]:
    """The owners' router rows of every MoE block, in layer and expert order.

    The public row stays as published: it is the fixed point every owner trained against, and an owner
    who joins later must share it (``flexmoe add`` checks that)."""
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


@claims_output("out")
def train_router(
    model: Path,
    proxies: list[Path],
    public: list[Path],
    out: Path,
    settings: RouterTrainSettings | None = None,
    *,
    sign_key=None,
    **overrides,
) -> dict:
    """Train the router rows of composed ``model`` on proxy sets + public data; write ``out``.

    ``settings`` (or keyword ``overrides`` of its fields) say how; ``sign_key`` (the maintainer's
    Ed25519 private key) signs ``out`` as it is written. Returns the new ``flexmoe.json``.
    """
    s = replace(settings or RouterTrainSettings(), **overrides)
    model, out = Path(model), Path(out)
    _check_inputs(model, public, out, s)
    work = claim_work_dir(out, s.resume, s.force)
    records, docs = _load_proxies(proxies)
    device = init_distributed()
    torch.manual_seed(s.seed)
    # The maintainer trains the router of its own model (as remove/add/update): unsigned is accepted,
    # a signature that does not hold is not.
    composed = from_pretrained(model, use_bias=False, device=device, trust=ALLOW_UNSIGNED)
    net = composed.model
    _start_from_trained_rows(net, model)
    seq_len = s.seq_len or training_seq_len(composed.meta)
    share = s.proxy_share if docs else 0.0
    train_blocks, valid_blocks, data_info = training_blocks(docs, public, composed.tokenizer, seq_len, share)
    rows = freeze_all_but_router_rows(net)
    before = frozen_digest(net)
    cfg = _router_config(s, seq_len)

    def loss_fn(m, batch):
        loss = lm_loss(m, batch)
        return loss + s.z_loss * router_z_loss(net).to(loss.device)

    stage = Stage(PackedBlocks(train_blocks), valid_blocks, LMStep(loss_fn), only(rows), desc="router")
    t0 = time.perf_counter()
    result = train(net, cfg, stage, RunOptions(work / "checkpoint", s.resume, quiet=s.quiet, device=device))
    check_frozen(net, before)
    record = {
        "method": "proxy-lm: next-token loss through the mixture, router rows only (FlexOlmo RT)",
        "experts": composed.names,
        "proxies": records,
        "data": {**data_info, "proxy_share": share},
        "config": {**asdict(cfg), "z_loss": s.z_loss},
        "tokens_seen": result.tokens_seen,
        "valid_loss": {"before": result.initial_valid_loss, "after": result.final_valid_loss},
        "seconds": time.perf_counter() - t0,
        "trainable": "the owners' router rows; the public row, biases, experts and shared weights frozen",
    }
    proxy_names = [r["name"] for r in records]
    new = _write_trained(model, out, net, composed.names, record, s, proxy_names, sign_key)
    if is_main():
        clear_checkpoint(work)
    return new


def _check_inputs(model: Path, public: list[Path], out: Path, s: RouterTrainSettings) -> None:
    if out.resolve() == model.resolve():
        raise FlexmoeError(
            "--out is the input model.", "write to a new directory; the input stays untouched."
        )
    if not public:
        raise FlexmoeError("No public data given.", "pass --public PATH (the public corpus).")
    if not 0.0 <= s.proxy_share < 1.0:
        raise FlexmoeError(f"--proxy-share {s.proxy_share} is not in [0, 1).", "use e.g. 0.5.")


def _load_proxies(proxies: list[Path]) -> tuple[list[dict], list[str]]:
    """The proxy sets' records (for flexmoe.json) and their documents."""
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
    return records, docs


def _start_from_trained_rows(net, model: Path) -> None:
    """A calibration holds only for the rows it was solved for: train from the rows as trained."""
    trained_public = trained_public_row(model)
    if trained_public is not None:
        with torch.no_grad():
            for i, block in enumerate(moe_blocks(net)):
                block.router[0].weight.copy_(trained_public(i).view(1, -1))


def _router_config(s: RouterTrainSettings, seq_len: int) -> TrainConfig:
    return TrainConfig(
        steps=s.steps,
        batch_size=s.batch_size,
        seq_len=seq_len,
        lr=s.lr,
        warmup_steps=min(DEFAULTS["warmup_steps"], max(1, s.steps // 10)),
        weight_decay=s.weight_decay,
        eval_every=max(1, s.steps // 2),
        eval_batches=4,
        checkpoint_every=max(1, s.steps // 4),
        log_every=max(1, s.steps // 10),
        seed=s.seed,
        compile=s.compile,
        frozen_bf16=False,  # the frozen tensors are checked bit for bit after training
    )


def _write_trained(
    model: Path, out: Path, net, names: list[str], record: dict, s, proxies, sign_key=None
) -> dict:
    """Write ``out`` with compose's streaming writer: trained owner rows, everything else as it was."""
    layers = [[row.weight.detach().view(-1).cpu() for row in block.router] for block in moe_blocks(net)]
    _, meta, experts = _current(model)
    if [e.name for e in experts] != names:
        raise FlexmoeError(f"{model} changed during router training.", "run it again.")
    # The public row did not train: keep it exactly as the checkpoint holds it (before calibration).
    # A model composed with another routing method trained from its routed rows: those are now the
    # trained rows (public row included), and the result is routed as "trained".
    routed = meta.get("routing", {}).get("method", "trained") != "trained"
    trained = [
        replace(ex, row=lambda i, e=e: layers[i][e]) if e or routed else ex for e, ex in enumerate(experts)
    ]
    event = _event("router-train", proxies=proxies, steps=s.steps)
    if not is_main():
        return {}
    # The output was checked to be free above (or --force/--resume given): replace it atomically.
    meta = {**meta, "router_training": record}
    how = ComposeSettings(max_shard_bytes=s.max_shard_bytes, routing="trained")
    prov = Provenance(sign_key=sign_key)
    return _rewrite(model, out, trained, meta, event, how, force=True, provenance=prov)
