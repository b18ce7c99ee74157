"""Anchored expert training: one data owner, alone, on its own data.

The anchor becomes a 2-expert mixture (frozen anchor FFN + trainable copy, top-2 of 2); only the
owner's FFN, router rows and biases train. Loss = next-token cross-entropy + router z-loss. Because
every owner trains against the same frozen anchor and the same published public router row, their
experts share one coordinate system and compose later without joint training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flexmoe.errors import FlexmoeError
from flexmoe.expert.privacy import DPConfig


@dataclass(frozen=True)
class ExpertPreset:
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup_steps: int


EXPERT_PRESETS = {
    "tiny": ExpertPreset(steps=250, batch_size=8, seq_len=256, lr=2e-3, warmup_steps=20),
    "small": ExpertPreset(steps=2000, batch_size=64, seq_len=512, lr=1e-3, warmup_steps=100),
    "base": ExpertPreset(steps=4000, batch_size=64, seq_len=1024, lr=9e-4, warmup_steps=200),
}


AUX_DEFAULT = 0.1


@dataclass
class ExpertSpec:
    """Who the expert belongs to and how it is initialised; written into the manifest."""

    name: str
    description: str = ""
    contact: str = ""
    license: str = "proprietary: usage terms set by the owner"
    router_init: str = "embed"
    bias_init: float = 0.0
    z_loss: float = 1e-3
    public_row: str | None = None  # DP only: which published public row to train against (embed/hidden)
    # Weight of the "mine vs public" routing loss. None: AUX_DEFAULT when public data is mixed in (and
    # no DP), else 0. Chosen on validation data: BENCHMARKS.md, "Routing methods at compose time".
    router_aux_loss: float | None = None


def check_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise FlexmoeError(f"Expert name {name!r} is not valid.", "use letters, digits, '-', '_' or '.'.")


def check_dense_anchor(config) -> None:
    """Refuse MoE checkpoints and anything flexmoe cannot wrap, with a message saying which."""
    from flexmoe.anchor import family

    if any(getattr(config, a, None) for a in ("num_experts", "num_local_experts")):
        raise FlexmoeError(
            f"The anchor ({config.model_type}) is a mixture-of-experts model, not a dense decoder.",
            "train experts against the dense public model the mixture was composed from.",
        )
    family(config)


def train_expert(
    anchor: str | Path,
    data: list[Path],
    name: str,
    out: Path,
    preset: str = "tiny",
    *,
    spec: ExpertSpec | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    resume: bool = False,
    force: bool = False,
    quiet: bool = False,
    stop_after: int | None = None,
    public: list[Path] | None = None,
    public_mix: float = 0.3,
    fsdp: bool = False,
    activation_checkpointing: bool = False,
    dp: DPConfig | None = None,
) -> dict:
    """Train one owner's expert and write its package to ``out``. Returns the manifest.

    ``public`` (public documents, which every owner may read) mixed in at ``public_mix`` of the
    training sequences gives the router negatives: it learns "mine vs public" instead of "always
    mine", which is what keeps composed models calibrated (measured in BENCHMARKS.md).
    ``fsdp`` shards the anchor and the expert with FSDP2 (bf16 compute on GPUs) instead of replicating
    them with DDP; ``activation_checkpointing`` trades recomputation for activation memory.
    ``dp`` (a ``flexmoe.expert.privacy.DPConfig``) trains with DP-SGD instead; its settings are
    checked, and the noise derived, before the model is loaded.
    """
    from flexmoe.anchor import fingerprint, load_anchor, load_config, resolve
    from flexmoe.data import blocks_for, data_fingerprint, load_splits
    from flexmoe.expert.package import expert_tensors, write_package
    from flexmoe.fileio import check_output_dir
    from flexmoe.moe import anchored_expert_model, project_biases_, router_z_loss
    from flexmoe.router.embed import init_rows
    from flexmoe.tokenizer import load_tokenizer
    from flexmoe.training import TrainConfig, clear_checkpoint, init_distributed, is_main, lm_loss, train

    spec = spec or ExpertSpec(name=name)
    check_name(name)
    out = Path(out)
    work = out.parent / f".{out.name}.work"
    if not resume:
        check_output_dir(out, force)
        if force:
            clear_checkpoint(work)
    elif dp is None:
        from flexmoe.expert.privacy import refuse_dp_checkpoint

        refuse_dp_checkpoint(work / "checkpoint")
    anchor_dir = resolve(anchor)
    config = load_config(anchor_dir)
    check_dense_anchor(config)
    p = EXPERT_PRESETS.get(preset)
    if p is None:
        raise FlexmoeError(f"Unknown preset {preset!r}.", f"use one of {', '.join(EXPERT_PRESETS)}.")
    seq_len = seq_len or p.seq_len
    if seq_len > config.max_position_embeddings:
        raise FlexmoeError(
            f"Sequence length {seq_len} exceeds the anchor's limit of {config.max_position_embeddings}.",
            f"pass --seq-len {config.max_position_embeddings} or less.",
        )
    splits = load_splits(data)
    tok = load_tokenizer(anchor_dir)
    train_blocks = blocks_for(splits.train, tok, seq_len)
    own_blocks = len(train_blocks)
    valid_blocks = blocks_for(splits.valid, tok, seq_len)
    public_info, public_docs = None, None
    if public:
        if not 0.0 < public_mix < 1.0:
            raise FlexmoeError(f"--public-mix {public_mix} is not between 0 and 1.", "use e.g. 0.5.")
        pub = load_splits(public)
        public_docs = pub.train
        pub_blocks = mixed_public_blocks(blocks_for(pub.train, tok, seq_len), len(train_blocks), public_mix)
        train_blocks = torch.cat([train_blocks, pub_blocks])
        public_info = {
            "fraction": public_mix,
            "blocks": len(pub_blocks),
            "fingerprint": data_fingerprint(pub.train),
        }
    dp_units = dp_plan = dp_record = None
    if dp is not None:
        from flexmoe.expert import privacy

        privacy.check_router_init(spec.router_init)
        dp_units = privacy.units_for(
            dp, train_blocks, own_blocks, splits.train, public_docs, public_mix, tok, seq_len
        )
        dp_plan = privacy.make_plan(
            dp,
            private_units=dp_units.private,
            sampled_units=len(dp_units),
            batch_size=batch_size or p.batch_size,
            steps=steps or p.steps,
        )

    device = init_distributed()
    torch.manual_seed(seed)
    # CPU trains in fp32; GPUs keep the frozen anchor in its own dtype under bf16 autocast.
    model = load_anchor(anchor_dir, torch.float32 if device.type == "cpu" else "auto").to(device)
    r_pub, r_own = init_rows(
        anchor_dir, model, tok, splits.train, spec.router_init, name=name, seq_len=seq_len
    )
    if dp is not None:  # the owner row is random (data-free); the public row matches the federation's
        r_pub = privacy.public_row(anchor_dir, spec.public_row)
    anchored_expert_model(model, r_pub.to(device), r_own.to(device), spec.bias_init)

    n_steps = steps or p.steps
    cfg = TrainConfig(
        steps=n_steps,
        batch_size=batch_size or p.batch_size,
        seq_len=seq_len,
        lr=lr or p.lr,
        warmup_steps=min(p.warmup_steps, max(1, n_steps // 10)),
        weight_decay=0.0,
        eval_every=max(1, n_steps // 4),
        checkpoint_every=max(1, n_steps // 10),
        log_every=max(1, n_steps // 20),
        seed=seed,
        fsdp=fsdp,
        activation_checkpointing=activation_checkpointing,
    )

    aux = None
    aux_weight = spec.router_aux_loss
    if aux_weight is None:
        aux_weight = AUX_DEFAULT if public_docs is not None and dp is None else 0.0
    if aux_weight > 0:
        from flexmoe.router.aux import MineVsPublic

        if public_docs is None or dp is not None:
            raise FlexmoeError(
                "--router-aux-loss needs public data (--public) and no DP.",
                "pass --public DIR, or drop --router-aux-loss.",
            )
        aux = MineVsPublic(model, train_blocks[own_blocks:])

    def loss_fn(m, batch):
        loss = lm_loss(m, batch) + spec.z_loss * router_z_loss(model).to(batch.device)
        if aux is not None and model.training:
            loss = loss + aux_weight * aux.loss(batch)
        return loss

    loop = {  # what the plain and the DP training loops share
        "checkpoint_dir": work / "checkpoint",
        "resume": resume,
        "stop_after": stop_after,
        "after_step": lambda: project_biases_(model),
        "quiet": quiet,
        "device": device,
    }
    if dp is None:
        result = train(model, train_blocks, valid_blocks, cfg, loss_fn=loss_fn, desc=f"expert {name}", **loop)
    else:
        result, dp_record = privacy.train_dp(
            model,
            dp_units,
            valid_blocks,
            cfg,
            dp,
            dp_plan,
            z_loss=spec.z_loss,
            eval_loss=loss_fn,
            desc=f"expert {name} (DP)",
            **loop,
        )
    if aux is not None:
        aux.close()
    if result.final_valid_loss is None:
        return {"finished": False}
    check_anchor_unchanged(model, anchor_dir)
    # Evaluation adds no z-loss. The 2-expert model starts as exactly the anchor (both FFNs identical,
    # weights sum to 1), so the initial validation loss is the anchor's loss on this owner's held-out data.
    anchor_loss, expert_loss = result.initial_valid_loss, result.final_valid_loss
    manifest = {
        "name": name,
        "description": spec.description,
        "contact": spec.contact,
        "license": spec.license,
        "anchor": {
            "fingerprint": fingerprint(anchor_dir),
            "model_type": config.model_type,
            "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
        },
        "router_init": spec.router_init,
        "bias_init": spec.bias_init,
        "router_aux_loss": aux_weight,
        "training": {**asdict(cfg), "preset": preset, "z_loss": spec.z_loss},
        "tokens_seen": result.tokens_seen,
        "seconds": result.seconds,
        "data": {
            "fingerprint": data_fingerprint(splits.train),
            "train_documents": len(splits.train),
            "valid_documents": len(splits.valid),
            "public_mix": public_info,
        },
        "valid_loss": {"anchor": anchor_loss, "expert": expert_loss},
        "history": result.history,
        "dp": dp_record,
    }
    tensors = expert_tensors(model)  # every rank: gathering shards is a collective
    if is_main():
        manifest = write_package(out, tensors, manifest, force=True)
        clear_checkpoint(work)
    return {"finished": True, **manifest}


def check_anchor_unchanged(model, anchor_dir: Path) -> None:
    """Fail loudly if any frozen anchor tensor changed: their fingerprint must equal the anchor's."""
    from flexmoe.anchor import fingerprint, fingerprint_tensors, iter_tensors
    from flexmoe.moe import anchor_state

    # Compare in the on-disk dtype: a bf16 anchor upcast to fp32 for CPU training casts back losslessly.
    on_disk = {name: t.dtype for name, t in iter_tensors(anchor_dir)}
    state = anchor_state(model)
    same = on_disk.keys() <= state.keys() and fingerprint_tensors(
        {n: state[n].to(dt) for n, dt in on_disk.items()}
    ) == fingerprint(anchor_dir)
    if not same:
        raise FlexmoeError(
            "Frozen anchor tensors changed during expert training.",
            "this is a bug in flexmoe; please report it with the command you ran.",
        )


def mixed_public_blocks(public_blocks: torch.Tensor, n_own: int, fraction: float) -> torch.Tensor:
    """Public blocks making up ``fraction`` of the training set (repeated if the public data is short)."""
    want = max(1, round(n_own * fraction / (1 - fraction)))
    reps = -(-want // len(public_blocks))
    return public_blocks.repeat(reps, 1)[:want]
