"""Anchored expert training: one data owner, alone, on its own data.

The anchor becomes a 2-expert mixture (frozen anchor FFN + trainable copy, top-2 of 2); only the
owner's FFN, router rows and biases train. Loss = next-token cross-entropy + router z-loss. Because
every owner trains against the same frozen anchor and the same published public router row, their
experts share one coordinate system and compose later without joint training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from flexmoe.anchor import family, fingerprint, iter_tensors, load_anchor, load_config, resolve
from flexmoe.checkpoint import check_run_inputs
from flexmoe.data import Splits, blocks_for, data_fingerprint, load_splits
from flexmoe.errors import FlexmoeError
from flexmoe.expert import privacy
from flexmoe.expert.package import expert_tensors, write_package
from flexmoe.expert.privacy import DPSettings
from flexmoe.expert.router_aux import MineVsPublic
from flexmoe.expert.shared import (
    EMBEDDINGS,
    OWNER_ROW_RATIO,
    attention_names,
    check_mode,
    owner_token_rows,
    shared_deltas,
    stray_rows,
    token_counts,
    train_attention,
    train_rows,
)
from flexmoe.fileio import claims_output
from flexmoe.moe import anchor_state, anchored_expert_model, project_biases_, router_z_loss
from flexmoe.router_init import init_rows
from flexmoe.tokenizer import load_tokenizer
from flexmoe.training import (
    LMStep,
    PackedBlocks,
    RunOptions,
    Stage,
    TrainConfig,
    claim_work_dir,
    clear_checkpoint,
    cpu_dtype,
    init_distributed,
    is_main,
    lm_loss,
    train,
    trainable_params,
)


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


# Share of public sequences in an owner's training when --public is given. 0.3 (the first default) let
# each owner's own 2-expert model claim 34-57% of public tokens and composed public perplexity rose 25%;
# at 0.6 it rose 3.8% for 2% less total gain, at 0.8 it fell 1.7% but owners kept a third less of their
# gain at the same steps (valid split of the demo federation: BENCHMARKS.md, "public mix").
PUBLIC_MIX = 0.6


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


@dataclass
class ExpertTrainSettings:
    """Everything ``flexmoe expert train`` takes besides its paths; the training part is recorded in
    the package manifest (``settings``)."""

    preset: str = "tiny"
    spec: ExpertSpec | None = None  # None: ExpertSpec(name) with the defaults
    steps: int | None = None  # None: the preset's
    batch_size: int | None = None
    seq_len: int | None = None
    lr: float | None = None
    seed: int = 0
    public: list[Path] | None = None  # public documents mixed in: the router learns "mine vs public"
    public_mix: float = PUBLIC_MIX
    # Embedding / LM-head rows that train beside the FFN (flexmoe.expert.shared): none (FlexOlmo), owner
    # (the rows of tokens frequent in this owner's data and rare in --public) or all.
    shared_rows: str = "none"
    row_ratio: float = OWNER_ROW_RATIO
    # The attention projections train too (flexmoe.expert.shared.train_attention): the owner's own
    # attention, kept whole only where flexmoe's runtime routes a sequence to this owner.
    shared_attention: bool = False
    fsdp: bool = False
    activation_checkpointing: bool = False
    compile: bool | None = None  # per-decoder-layer torch.compile; None: on CUDA only
    cpu_dtype: str = "float32"  # on CPU: "float32", or "float64" (reference runs, training.cpu_dtype)
    early_stop: int = 3  # evaluations without a better validation loss before stopping (0: off)
    evaluations: int = 10  # validation passes over a run (early stopping decides at these)
    dp: DPSettings | None = None  # DP-SGD instead of plain training
    resume: bool = False
    force: bool = False
    quiet: bool = False
    stop_after: int | None = None  # tests: end after this many steps, as an interruption would

    def record(self) -> dict:
        """The settings a package reports (paths and run control left out)."""
        skip = {"spec", "public", "resume", "force", "quiet", "stop_after"}
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self) if f.name not in skip}


def _jsonable(v):
    return asdict(v) if hasattr(v, "__dataclass_fields__") else v


def check_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise FlexmoeError(f"Expert name {name!r} is not valid.", "use letters, digits, '-', '_' or '.'.")


def check_dense_anchor(config) -> None:
    """Refuse MoE checkpoints and anything flexmoe cannot wrap, with a message saying which."""
    if any(getattr(config, a, None) for a in ("num_experts", "num_local_experts")):
        raise FlexmoeError(
            f"The anchor ({config.model_type}) is a mixture-of-experts model, not a dense decoder.",
            "train experts against the dense public model the mixture was composed from.",
        )
    family(config)


@dataclass
class _Data:
    """An owner's training data, tokenised: its blocks (with public blocks mixed in) and documents."""

    splits: Splits
    train: torch.Tensor
    valid: torch.Tensor
    own_blocks: int
    public_docs: list[str] | None = None
    public_info: dict | None = None
    tokenizer: object = None
    seq_len: int = 0
    rows: torch.Tensor | None = None  # shared_rows "owner": the embedding / LM-head rows that may train


@dataclass
class _Plan:
    """Resolved settings: the loop's config, and for DP its units and plan."""

    cfg: TrainConfig
    units: object = None
    dp_plan: object = None


@claims_output("out")
def train_expert(
    anchor: str | Path,
    data: list[Path],
    name: str,
    out: Path,
    preset: str | None = None,
    *,
    settings: ExpertTrainSettings | None = None,
    **overrides,
) -> dict:
    """Train one owner's expert and write its package to ``out``. Returns the manifest.

    ``settings`` (or keyword ``overrides`` of its fields) say how; ``public`` documents mixed in at
    ``public_mix`` of the training sequences give the router negatives: it learns "mine vs public"
    instead of "always mine", which keeps composed models calibrated (BENCHMARKS.md). With ``dp``
    the settings are checked, and the noise derived, before the model is loaded.
    """
    s = replace(settings or ExpertTrainSettings(), **overrides)
    s = replace(s, preset=preset) if preset else s
    spec = s.spec or ExpertSpec(name=name)
    check_name(name)
    check_shared_tensors(s)
    cpu_dtype(s.cpu_dtype)  # an unknown dtype fails before the data is read
    out = Path(out)
    work = claim_work_dir(out, s.resume, s.force)
    anchor_dir = resolve(anchor)
    config = load_config(anchor_dir)
    check_dense_anchor(config)
    d = _load_data(anchor_dir, data, s, config)
    # a resumed run must continue on the same data and anchor under the same name
    check_run_inputs(work, s.resume, data=data_fingerprint(d.splits.train), anchor=str(anchor), name=name)
    plan = _plan(s, spec, d)
    device = init_distributed()
    torch.manual_seed(s.seed)
    model = _expert_model(anchor_dir, name, spec, s, d, device)
    stage = _stage(model, spec, s, d, plan, name)
    run = RunOptions(work / "checkpoint", s.resume, s.stop_after, s.quiet, device)
    result = train(model, plan.cfg, stage, run)
    if result.final_valid_loss is None:
        return {"finished": False}
    deltas = _checked_deltas(model, anchor_dir, s, d)
    manifest = _manifest(name, spec, s, config, anchor_dir, d, plan.cfg, result)
    tensors = expert_tensors(model)  # every rank: gathering shards is a collective
    if is_main():
        manifest = write_package(out, tensors, manifest, force=True, shared_deltas=deltas)
        clear_checkpoint(work)
    return {"finished": True, **manifest}


def check_shared_tensors(s: ExpertTrainSettings) -> None:
    """Refuse shared-tensor settings (rows, attention) that cannot work, before any data is read."""
    check_mode(s.shared_rows)
    if (s.row_ratio != OWNER_ROW_RATIO and s.shared_rows != "owner") or not s.row_ratio > 0:
        raise FlexmoeError(
            f"--row-ratio {s.row_ratio} is not usable with --shared-rows {s.shared_rows}.",
            "give a --row-ratio above 0, with --shared-rows owner only.",
        )
    if s.shared_rows == "none" and not s.shared_attention:
        return
    if s.shared_rows == "owner" and not s.public:
        raise FlexmoeError(
            "--shared-rows owner chooses your tokens by comparing your data with public data.",
            "pass --public DIR, or --shared-rows none.",
        )
    if s.dp is not None or s.fsdp:
        flag, why = ("--dp-epsilon", "they are not private") if s.dp else ("--fsdp", "not sharded")
        what = "--shared-attention" if s.shared_attention else f"--shared-rows {s.shared_rows}"
        raise FlexmoeError(
            f"{what} does not combine with {flag} ({why}).", "train no shared tensors (the default)."
        )


def _shares(s: ExpertTrainSettings) -> bool:
    """Whether the owner trains any shared (anchor) tensor."""
    return s.shared_rows != "none" or s.shared_attention


def _checked_deltas(model, anchor_dir: Path, s: ExpertTrainSettings, d: _Data) -> dict | None:
    """The shared deltas the package ships (None when it trains no shared tensor), refusing a change to
    any frozen anchor tensor or to a row outside the owner's."""
    trained = (EMBEDDINGS if s.shared_rows != "none" else ()) + (
        attention_names(model) if s.shared_attention else ()
    )
    check_anchor_unchanged(model, anchor_dir, trained=trained)  # frozen ones may be bf16 copies
    if not trained:
        return None
    deltas = shared_deltas(model, anchor_dir, trained)
    stray = stray_rows(deltas, d.rows)
    if stray:
        raise FlexmoeError(
            f"Frozen shared tensors changed ({', '.join(stray[:3])}).", "this is a bug; please report it."
        )
    return deltas


def _preset(s: ExpertTrainSettings) -> ExpertPreset:
    p = EXPERT_PRESETS.get(s.preset)
    if p is None:
        raise FlexmoeError(f"Unknown preset {s.preset!r}.", f"use one of {', '.join(EXPERT_PRESETS)}.")
    return p


def _load_data(anchor_dir: Path, data: list[Path], s: ExpertTrainSettings, config) -> _Data:
    """Tokenise and pack the owner's data, with the public mix appended."""
    seq_len = s.seq_len or _preset(s).seq_len
    if seq_len > config.max_position_embeddings:
        raise FlexmoeError(
            f"Sequence length {seq_len} exceeds the anchor's limit of {config.max_position_embeddings}.",
            f"pass --seq-len {config.max_position_embeddings} or less.",
        )
    splits = load_splits(data)
    tok = load_tokenizer(anchor_dir)
    train_blocks = blocks_for(splits.train, tok, seq_len)
    d = _Data(splits, train_blocks, blocks_for(splits.valid, tok, seq_len), len(train_blocks), tokenizer=tok)
    d.seq_len = seq_len
    if s.public:
        if not 0.0 < s.public_mix < 1.0:
            raise FlexmoeError(f"--public-mix {s.public_mix} is not between 0 and 1.", "use e.g. 0.5.")
        pub = load_splits(s.public)
        all_public = blocks_for(pub.train, tok, seq_len)
        pub_blocks = mixed_public_blocks(all_public, len(train_blocks), s.public_mix)
        d.train = torch.cat([train_blocks, pub_blocks])
        d.public_docs = pub.train
        d.public_info = {
            "fraction": s.public_mix,
            "blocks": len(pub_blocks),
            "fingerprint": data_fingerprint(pub.train),
        }
        if s.shared_rows == "owner":
            own, public = (token_counts(b.flatten(), config.vocab_size) for b in (train_blocks, all_public))
            d.rows = owner_token_rows(own, public, s.row_ratio, tok.all_special_ids)
    return d


def _plan(s: ExpertTrainSettings, spec: ExpertSpec, d: _Data) -> _Plan:
    """The loop's settings from the preset and the overrides; for DP, units and the noise plan."""
    p = _preset(s)
    n_steps = s.steps or p.steps
    cfg = TrainConfig(
        steps=n_steps,
        batch_size=s.batch_size or p.batch_size,
        seq_len=d.seq_len,
        lr=s.lr or p.lr,
        warmup_steps=min(p.warmup_steps, max(1, n_steps // 10)),
        weight_decay=0.0,
        eval_every=max(1, n_steps // max(1, s.evaluations)),
        checkpoint_every=max(1, n_steps // 10),
        log_every=max(1, n_steps // 20),
        seed=s.seed,
        fsdp=s.fsdp,
        activation_checkpointing=s.activation_checkpointing,
        early_stop=s.early_stop,
        # With trainable embeddings, per-layer compile on an H200 left the "mine vs public" loss's
        # router-input hooks unrecorded (torch 2.11): such runs stay eager unless --compile is given.
        compile=False if s.compile is None and _shares(s) else s.compile,
    )
    if s.dp is None:
        return _Plan(cfg)
    privacy.check_router_init(spec.router_init)
    units = privacy.units_for(
        s.dp, d.train, d.own_blocks, d.splits.train, d.public_docs, s.public_mix, d.tokenizer, d.seq_len
    )
    dp_plan = privacy.make_plan(
        s.dp, private_units=units.private, sampled_units=len(units), batch_size=cfg.batch_size, steps=n_steps
    )
    return _Plan(cfg, units, dp_plan)


def _expert_model(anchor_dir: Path, name: str, spec: ExpertSpec, s: ExpertTrainSettings, d: _Data, device):
    """The anchor turned into the owner's 2-expert training model, with its router rows."""
    # CPU trains in fp32 (or the settings' float64); GPUs keep the frozen anchor in bf16 (the loop
    # casts) under bf16 autocast.
    model = load_anchor(anchor_dir, cpu_dtype(s.cpu_dtype) if device.type == "cpu" else "auto").to(device)
    r_pub, r_own = init_rows(
        anchor_dir, model, d.tokenizer, d.splits.train, spec.router_init, name=name, seq_len=d.seq_len
    )
    if s.dp is not None:  # the owner row is random (data-free); the public row matches the federation's
        r_pub = privacy.public_row(anchor_dir, spec.public_row)
    return anchored_expert_model(model, r_pub.to(device), r_own.to(device), spec.bias_init)


def aux_loss_weight(spec: ExpertSpec, s: ExpertTrainSettings) -> float:
    """The "mine vs public" routing loss weight: as given, else AUX_DEFAULT when public data is mixed in
    and there is no DP (DP would need it inside the per-sample gradients), else 0."""
    w = spec.router_aux_loss
    if w is None:
        return AUX_DEFAULT if s.public and s.dp is None else 0.0
    if w > 0 and (not s.public or s.dp is not None):
        raise FlexmoeError(
            "--router-aux-loss needs public data (--public) and no DP.",
            "pass --public DIR, or drop --router-aux-loss.",
        )
    return w


def _stage(model, spec: ExpertSpec, s: ExpertTrainSettings, d: _Data, plan: _Plan, name: str) -> Stage:
    """LM loss + router z-loss (+ the "mine vs public" routing loss when public data is mixed in), or
    DP-SGD over privacy units; biases projected onto b <= 0."""
    aux_weight = aux_loss_weight(spec, s)
    # Hooks on the MoE blocks record router inputs; they stay for the model's (training) lifetime.
    aux = MineVsPublic(model, d.train[d.own_blocks :]) if aux_weight > 0 else None

    def loss_fn(m, batch):
        loss = lm_loss(m, batch) + spec.z_loss * router_z_loss(model).to(batch.device)
        if aux is not None and model.training:
            loss = loss + aux_weight * aux.loss(batch)
        return loss

    if s.dp is None:
        strategy, source, desc = LMStep(loss_fn), PackedBlocks(d.train), f"expert {name}"
    else:
        strategy = privacy.DPStep(s.dp, plan.dp_plan, spec.z_loss, loss_fn)
        source, desc = plan.units, f"expert {name} (DP)"

    def select(m):
        if s.shared_rows != "none":
            train_rows(m, d.rows)
        if s.shared_attention:
            train_attention(m)
        return trainable_params(m)

    return Stage(source, d.valid, strategy, select, after_step=lambda: project_biases_(model), desc=desc)


def _manifest(name, spec, s, config, anchor_dir, d: _Data, cfg: TrainConfig, result) -> dict:
    """The package manifest. Evaluation adds no z-loss. The 2-expert model starts as exactly the anchor
    (both FFNs identical, weights sum to 1), so the initial validation loss is the anchor's loss on this
    owner's held-out data."""
    return {
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
        "router_aux_loss": aux_loss_weight(spec, s),
        "training": {**asdict(cfg), "preset": s.preset, "z_loss": spec.z_loss},
        "settings": s.record(),
        "tokens_seen": result.tokens_seen,
        "seconds": result.seconds,
        "data": {
            "fingerprint": data_fingerprint(d.splits.train),
            "train_documents": len(d.splits.train),
            "valid_documents": len(d.splits.valid),
            "public_mix": d.public_info,
        },
        "shared_rows": None
        if s.shared_rows == "none"
        else {
            "mode": s.shared_rows,
            "ratio": s.row_ratio if s.shared_rows == "owner" else None,
            "rows": None if d.rows is None else int(d.rows.sum()),
        },
        "shared_attention": s.shared_attention,
        "valid_loss": {"anchor": result.initial_valid_loss, "expert": result.final_valid_loss},
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "history": result.history,
        "dp": result.record,
    }


def check_anchor_unchanged(model, anchor_dir: Path, trained: tuple[str, ...] = ()) -> None:
    """Fail loudly if any frozen anchor tensor (all but ``trained``) changed.

    Compared in the lower of the two precisions: a bf16 anchor upcast to fp32 for CPU training casts
    back losslessly, and an fp32 anchor stored in bf16 on a GPU must equal its on-disk tensors in bf16.
    """
    state = anchor_state(model)
    for name, t in iter_tensors(anchor_dir):
        if name in trained:
            continue
        mine = state.get(name)
        low = t.dtype if mine is None or t.element_size() <= mine.element_size() else mine.dtype
        if mine is None or not torch.equal(mine.to(low).cpu(), t.to(low)):
            raise FlexmoeError(
                "Frozen anchor tensors changed during expert training.",
                "this is a bug in flexmoe; please report it with the command you ran.",
            )


def mixed_public_blocks(public_blocks: torch.Tensor, n_own: int, fraction: float) -> torch.Tensor:
    """Public blocks making up ``fraction`` of the training set (repeated if the public data is short)."""
    want = max(1, round(n_own * fraction / (1 - fraction)))
    reps = -(-want // len(public_blocks))
    return public_blocks.repeat(reps, 1)[:want]
