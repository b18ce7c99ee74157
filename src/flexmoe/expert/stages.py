"""Post-training stages of an owner's expert with BAR's progressive unfreezing, each resuming from the
previous stage's package (``--from PKG``):

| stage | trains | data, loss |
|---|---|---|
| mid | owner FFN + owner router row (shared frozen, as FlexOlmo) | domain + public text, next token |
| sft | + embedding, LM-head rows of the owner's tokens (``shared_rows``) | domain + public chat, replies |
| rl  | everything (attention, norms, anchor FFN, router) | tasks with checkable answers, GRPO (no KL) |

mid and sft add the router z-loss and, with public data, the "mine vs public" routing loss on the owner's
row (``router_aux``); attention, norms and the anchor FFN stay frozen until rl.
``freeze_shared`` reproduces FlexOlmo's frozen recipe in every stage: owner FFN and router row only.
The public router row never trains: it is the federation's fixed reference point, shared by every
package (``compose`` refuses packages that disagree on it).

Shared tensors that a stage changed leave the owner's machine as deltas from the anchor
(``shared_delta.safetensors`` in the package, hashed in the manifest); ``flexmoe.compose_shared``
merges them. All stages run against one anchor (the post-trained one), so the deltas of mid, sft and
rl accumulate in one coordinate system.

Each stage is a ``flexmoe.training.Stage``: the selector is the stage's trainable set, the batch
source packed text (mid) or ``LabeledRows`` of chat with ``IGNORE`` outside assistant turns (sft), the
step LM loss + router z-loss (mid, sft; the labels make sft's loss assistant-only) or GRPO (rl); the
schedule linear to zero (mid, sft: BAR SFT) or constant (rl: BAR RL).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from flexmoe.anchor import fingerprint, load_anchor, load_config, resolve
from flexmoe.chat import chat_rows, chat_splits, encode_conversation, require_chat_tokens
from flexmoe.chat_data import read_tasks
from flexmoe.data import blocks_for, data_fingerprint, load_splits
from flexmoe.errors import FlexmoeError
from flexmoe.expert import package as pkg
from flexmoe.expert.grpo import GRPOConfig, GRPOLoss, GRPOStep
from flexmoe.expert.router_aux import MineVsPublic
from flexmoe.expert.shared import (
    EMBEDDINGS,
    OWNER_ROW_RATIO,
    model_name,
    owner_token_rows,
    shared_deltas,
    stray_rows,
    token_counts,
    train_rows,
)
from flexmoe.expert.train import check_dense_anchor, check_name, mixed_public_blocks
from flexmoe.formats import write_expert_manifest
from flexmoe.moe import anchored_expert_model, moe_blocks, project_biases_, router_z_loss
from flexmoe.prompt_centroids import FIELD, centroid_record, measure
from flexmoe.router_init import init_rows
from flexmoe.tokenizer import load_tokenizer
from flexmoe.training import (
    LabeledRows,
    LMStep,
    PackedBlocks,
    RunOptions,
    Stage,
    TrainConfig,
    claim_work_dir,
    clear_checkpoint,
    init_distributed,
    lm_loss,
    train,
)

STAGES = ("mid", "sft", "rl")
SHARED_ROWS = ("owner", "all")  # sft's choices (``flexmoe.expert.shared``)


@dataclass
class StageSettings:
    """One stage's settings (serialised into the manifest)."""

    stage: str
    freeze_shared: bool = False
    steps: int = 60
    batch_size: int = 8  # sequences per step (rl: prompts per step)
    seq_len: int = 256
    lr: float = 1e-3
    warmup_fraction: float = 0.03  # BAR SFT: 3% warmup
    schedule: str = "linear"  # after warmup: linear to 0 (BAR SFT); rl: constant (BAR RL)
    public_mix: float = 0.3  # share of public (chat) sequences mixed into mid / sft
    z_loss: float = 1e-3
    router_init: str = "hidden"
    seed: int = 0
    grpo: dict = field(default_factory=dict)  # rl: flexmoe.expert.grpo.GRPOConfig fields
    # sft: which embedding / LM-head rows may change. "owner": only the rows of tokens frequent in the
    # owner's data and rare in public chat (``owner_rows``), so that owners' changes to shared tensors
    # are nearly disjoint and a merge can keep each whole; "all": every row (BAR).
    shared_rows: str = "owner"
    row_ratio: float = OWNER_ROW_RATIO
    # mid / sft with public data: weight of the "mine vs public" routing loss on the owner's router row
    # (flexmoe.expert.router_aux; 0: the row learns only through the LM loss, as FlexOlmo's)
    router_aux: float = 0.0

    def __post_init__(self) -> None:
        if self.shared_rows not in SHARED_ROWS:  # here, so that a direct construction is checked too
            raise FlexmoeError(
                f"Unknown shared rows {self.shared_rows!r}.", f"use one of {', '.join(SHARED_ROWS)}."
            )

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            lr=self.lr,
            schedule=self.schedule,
            warmup_steps=max(1, round(self.steps * self.warmup_fraction)),
            eval_every=max(1, self.steps // 4),
            eval_batches=2,
            checkpoint_every=max(1, self.steps // 5),
            log_every=max(1, self.steps // 10),
            seed=self.seed,
            frozen_bf16=False,  # shared deltas are taken against the anchor bit for bit
        )


@dataclass
class StageRun:
    """Where a stage starts from and how this call runs (not part of the manifest's settings)."""

    from_package: Path | None = None
    public: Path | None = None
    resume: bool = False
    force: bool = False
    quiet: bool = False
    sign_key: object = None  # the owner's Ed25519 private key: sign the package as it is written


# Tiny-model values; BAR's (7B) are in the module docstring of the method notes. Public mix 0.6 and the
# "mine vs public" routing loss (0.1) as in expert training (issue 13); for sft chosen on validation
# tasks that neither training nor the reported test tasks contain (BENCHMARKS.md, "Post-training").
STAGE_DEFAULTS = {
    "mid": {"lr": 2e-3, "steps": 120, "public_mix": 0.6, "router_aux": 0.1},
    "sft": {"lr": 1e-3, "steps": 80, "public_mix": 0.6, "router_aux": 0.1},
    "rl": {"lr": 1e-5, "steps": 20, "batch_size": 4, "schedule": "constant", "warmup_fraction": 0.0},
}


def settings_for(stage: str, **overrides) -> StageSettings:
    if stage not in STAGES:
        raise FlexmoeError(f"Unknown stage {stage!r}.", f"use one of {', '.join(STAGES)}.")
    given = {k: v for k, v in overrides.items() if v is not None}
    kl = given.get("grpo", {}).get("kl_coef")
    if kl is not None and (stage != "rl" or not kl >= 0):
        raise FlexmoeError(f"--kl {kl} is not usable here.", "give --kl >= 0, with --stage rl only.")
    return StageSettings(stage=stage, **{**STAGE_DEFAULTS[stage], **given})


# --------------------------------------------------------------------------------------------------
# The parameter selector


def is_trainable(name: str, stage: str, freeze_shared: bool) -> bool:
    """Whether parameter ``name`` of a 2-expert training model trains in ``stage``."""
    if ".mlp.router.0." in name:  # the public row: fixed for the whole federation
        return False
    if ".mlp.experts.1." in name or ".mlp.router.1." in name:
        return True
    if freeze_shared or stage == "mid":
        return False
    if stage == "sft":
        return name in EMBEDDINGS
    return True  # rl: everything


def select_parameters(model, stage: str, freeze_shared: bool) -> list[torch.nn.Parameter]:
    """Set ``requires_grad`` per the stage and return the trainable parameters."""
    chosen = []
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name, stage, freeze_shared))
        if p.requires_grad:
            chosen.append(p)
    return chosen


# --------------------------------------------------------------------------------------------------
# Shared deltas: anchor names <-> names inside the 2-expert model


@torch.no_grad()
def load_package_into(model, package: Path, anchor_fp: str) -> dict:
    """Put a package's owner FFN, router row, bias and shared deltas into a fresh 2-expert model built
    from the same anchor. Returns the package manifest."""
    manifest = pkg.verify(package)
    if manifest["anchor"]["fingerprint"] != anchor_fp:
        raise FlexmoeError(
            f"{package} was trained against another anchor.",
            "continue a package with the anchor it was trained against.",
        )
    t = pkg.load_tensors(package)
    for i, block in enumerate(moe_blocks(model)):
        for proj in pkg.FFN:
            getattr(block.experts[1], proj).weight.copy_(t[f"layers.{i}.{proj}.weight"])
        block.router[1].weight.copy_(t[f"layers.{i}.router.weight"].view(1, -1))
        block.router[1].bias_raw.copy_(t[f"layers.{i}.router.bias"].view(1))
        block.router[0].weight.copy_(t[f"layers.{i}.public_router.weight"].view(1, -1))
    if manifest.get("shared_deltas"):
        params = dict(model.named_parameters())
        for name, d in load_file(str(Path(package) / pkg.SHARED_FILE)).items():
            p = params[model_name(name)]
            p.copy_((p.float() + d.to(p.device)).to(p.dtype))
    return manifest


def expert_model(
    anchor_dir: Path, package: Path | None = None, *, owner_docs=None, router_init="hidden", name="expert"
):
    """The 2-expert model of an owner (anchor FFN + owner FFN, both router rows) on CPU in fp32,
    continued from ``package`` when given, else freshly initialised from the anchor."""
    model = load_anchor(anchor_dir, torch.float32)
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    if package is not None:
        anchored_expert_model(model, torch.zeros(L, H), torch.zeros(L, H))
        return model, load_package_into(model, package, fingerprint(anchor_dir))
    tok = load_tokenizer(anchor_dir)
    r_pub, r_own = init_rows(anchor_dir, model, tok, owner_docs, router_init, name=name, seq_len=128)
    return anchored_expert_model(model, r_pub, r_own), None


# --------------------------------------------------------------------------------------------------
# Batch sources and losses per stage


def stage_data(s: StageSettings, data: Path, public: Path | None, tok) -> tuple:
    """(batch source, validation batch, owner text for router init, data record) of a stage.

    mid: packed text; sft: chat ``LabeledRows`` (``flexmoe.chat``); rl: task indices ``[n, 1]``."""
    if s.stage == "rl":
        tasks = read_tasks(tasks_file(data))
        idx = torch.arange(len(tasks)).view(-1, 1)
        text = [m["content"] for t in tasks for m in t["messages"]]
        record = {"tasks": len(tasks), "fingerprint": data_fingerprint(text)}
        return PackedBlocks(idx), idx[: min(len(idx), 8)], text, record, None
    if s.stage == "mid":
        splits = load_splits([data])
        train, valid = [blocks_for(splits.train, tok, s.seq_len)], blocks_for(splits.valid, tok, s.seq_len)
        own = splits.train
        pub = (lambda: [blocks_for(load_splits([public]).train, tok, s.seq_len)]) if public else None
    else:
        tr, va = chat_splits(data)
        rows, v = chat_rows(tr, tok, s.seq_len), chat_rows(va, tok, s.seq_len)
        train, valid = [rows.ids, rows.labels], (v.ids, v.labels)
        own = [tok.apply_chat_template(c, tokenize=False) for c in tr]
        pub = (lambda: _fields(chat_rows(chat_splits(public)[0], tok, s.seq_len))) if public else None
    record = {"fingerprint": data_fingerprint(own), "train_blocks": len(train[0]), "public_mix": None}
    public_ids = None
    if pub is not None:
        extra = [mixed_public_blocks(t, len(train[0]), s.public_mix) for t in pub()]
        train = [torch.cat([t, e]) for t, e in zip(train, extra, strict=True)]
        record["public_mix"] = {"fraction": s.public_mix, "blocks": len(extra[0])}
        public_ids = extra[0]
    source = PackedBlocks(train[0]) if s.stage == "mid" else LabeledRows(*train)
    return source, valid, own, record, public_ids


def _fields(rows: LabeledRows) -> list[torch.Tensor]:
    return [rows.ids, rows.labels]


def tasks_file(data: Path) -> Path:
    return Path(data) / "rl.jsonl" if Path(data).is_dir() else Path(data)


def stage_selector(s: StageSettings, rows: torch.Tensor | None = None):
    """The selector of a stage: sets ``requires_grad`` on its trainable set and returns it as one group.
    ``rows`` (bool ``[vocab]``): the embedding and LM-head rows that may change; the gradient of every
    other row is zeroed, so AdamW (no weight decay) leaves them bit for bit as the anchor has them."""

    def select(model):
        params = select_parameters(model, s.stage, s.freeze_shared)
        if rows is not None:
            train_rows(model, rows)  # the embeddings are trainable already: this adds the row mask
        return [{"params": params}]

    return select


def owner_rows(s: StageSettings, data: Path, public: Path | None, tok, vocab: int) -> torch.Tensor | None:
    """The embedding / LM-head rows an sft stage may change (None: all of them). A token is the owner's
    when it occurs at least ``OWNER_ROW_MIN_COUNT`` times in the owner's chat and at least
    ``row_ratio`` times as often (per token) as in public chat; special tokens never are (the chat
    template belongs to the anchor). Computed from the owner's data and public data only."""
    if s.stage != "sft" or s.freeze_shared or s.shared_rows == "all":
        return None

    def counts(path: Path) -> torch.Tensor:
        return token_counts((i for c in chat_splits(path)[0] for i in encode_conversation(tok, c)[0]), vocab)

    pub = counts(public) if public is not None else torch.zeros(vocab, dtype=torch.float64)
    return owner_token_rows(counts(data), pub, s.row_ratio, tok.all_special_ids)


def stage_step(s: StageSettings, model, tasks: list[dict] | None, tok, public_ids=None):
    """The step strategy: LM loss (assistant-only through the labels in sft) + router z-loss (+ the
    "mine vs public" routing loss with public rows mixed in); rl GRPO."""
    if s.stage == "rl":
        cfg = GRPOConfig(**s.grpo)
        # The KL reference: a frozen copy of the starting model (one more model in memory).
        ref = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kl_coef > 0 else None
        return GRPOStep(GRPOLoss(tasks, tok, cfg, reference=ref))
    aux = MineVsPublic(model, public_ids) if public_ids is not None and s.router_aux > 0 else None

    def loss(m, batch):
        base = lm_loss(m, batch)
        base = base + s.z_loss * router_z_loss(model).to(base.device)
        if aux is not None and model.training:
            ids = batch[0] if isinstance(batch, tuple) else batch
            base = base + s.router_aux * aux.loss(ids)
        return base

    return LMStep(loss)


# --------------------------------------------------------------------------------------------------
# The stage entry point


def train_stage(
    anchor: str | Path, data: Path, name: str, out: Path, settings: StageSettings, **options
) -> dict:
    """Run one post-training stage and write the package to ``out``. Returns the manifest.
    ``options``: fields of ``StageRun`` (``from_package``, ``public``, ``resume``, ``force``, ``quiet``,
    ``sign_key``)."""
    s, r = settings, StageRun(**options)
    check_name(name)
    out = Path(out)
    work = claim_work_dir(out, r.resume, r.force)
    anchor_dir = resolve(anchor)
    config = load_config(anchor_dir)
    check_dense_anchor(config)
    tok = load_tokenizer(anchor_dir)
    if s.stage != "mid":
        require_chat_tokens(tok, f"Anchor {anchor_dir}")
    source, valid, own_text, data_record, public_ids = stage_data(s, Path(data), r.public, tok)
    torch.manual_seed(s.seed)
    model, prev = expert_model(
        anchor_dir, r.from_package, owner_docs=own_text, router_init=s.router_init, name=name
    )
    device = init_distributed()  # the GPU when there is one (the model is built on the CPU)
    model.to(device)
    if prev is not None and prev["name"] != name:
        raise FlexmoeError(
            f"{r.from_package} belongs to expert {prev['name']!r}, not {name!r}.",
            f"pass --name {prev['name']}.",
        )
    tasks = read_tasks(tasks_file(data)) if s.stage == "rl" else None
    rows = owner_rows(s, Path(data), r.public, tok, model.config.vocab_size)
    stage = Stage(
        source,
        valid,
        stage_step(s, model, tasks, tok, public_ids),
        stage_selector(s, rows),
        after_step=lambda: project_biases_(model),
        desc=f"expert {name} ({s.stage}{', frozen shared' if s.freeze_shared else ''})",
    )
    cfg = s.train_config()
    result = train(model, cfg, stage, RunOptions(work / "checkpoint", r.resume, quiet=r.quiet, device=device))
    if result.final_valid_loss is None:
        return {"finished": False}
    deltas = _checked_deltas(model, anchor_dir, s, prev, rows)
    if rows is not None:  # how many rows this owner may change: what its shared delta can touch
        data_record["owner_rows"] = int(rows.sum())
    record = _stage_record(s, prev, data_record, result, model)
    manifest = _manifest(name, prev, anchor_dir, config, s, cfg, record, result)
    centroid = owner_centroid(s, anchor_dir, Path(data), tok, device) or (prev or {}).get(FIELD)
    if centroid is not None:
        manifest[FIELD] = centroid
    manifest = pkg.write_package(
        out, pkg.expert_tensors(model), manifest, force=True, sign_key=r.sign_key, shared_deltas=deltas
    )
    clear_checkpoint(work)
    return {"finished": True, **manifest}


def owner_centroid(s: StageSettings, anchor_dir: Path, data: Path, tok, device) -> dict | None:
    """The owner's prompt centroid (``flexmoe.prompt_centroids``) after an sft stage: its own chat
    prompts (not the public mix) in the anchor it trained against. None for other stages."""
    if s.stage != "sft":
        return None
    anchor = load_anchor(anchor_dir, torch.float32).to(device)
    return centroid_record(anchor, tok, chat_splits(data)[0])


def add_prompt_centroid(package: Path, anchor: str | Path, chat: Path) -> dict:
    """Owner: give a chat package trained before packages carried one its prompt centroid (what an sft
    stage adds: ``owner_centroid``), from the owner's chat conversations (``chat``: a directory with
    ``train.jsonl`` or a file) in the anchor it was trained against. The tensors stay untouched, so the
    hashes hold; a signature no longer does and is dropped: the owner signs again. Returns the entry."""
    manifest = pkg.verify(package)
    anchor_dir = resolve(anchor)
    check_dense_anchor(load_config(anchor_dir))  # an anchor at all, before fingerprinting it
    if manifest["anchor"]["fingerprint"] != fingerprint(anchor_dir):
        raise FlexmoeError(
            f"{package} was trained against another anchor than {anchor_dir}.",
            "pass the (post-trained) anchor the package was trained against.",
        )
    tok = load_tokenizer(anchor_dir)
    require_chat_tokens(tok, f"Anchor {anchor_dir}")
    record = measure(anchor_dir, tok, chat, "pass your whole chat training set.")
    write_expert_manifest(package, {**manifest, FIELD: record})
    return record


def _checked_deltas(model, anchor_dir: Path, s: StageSettings, prev: dict | None, rows=None) -> dict:
    """The shared deltas, refusing any on a tensor neither this stage nor an earlier one trained, and
    (with owner rows, from a fresh start) any on an embedding or LM-head row outside them."""
    allowed = {n for n, _ in model.named_parameters() if is_trainable(n, s.stage, s.freeze_shared)}
    allowed |= {model_name(k) for k in ((prev or {}).get("shared_deltas") or {}).get("tensors", {})}
    deltas = shared_deltas(model, anchor_dir)
    stray = sorted(n for n in deltas if model_name(n) not in allowed)
    if not (prev or {}).get("shared_deltas"):
        stray += stray_rows(deltas, rows)
    if stray:
        raise FlexmoeError(
            f"Frozen shared tensors changed ({', '.join(stray[:3])}).", "this is a bug; please report it."
        )
    return deltas


def _stage_record(s: StageSettings, prev: dict | None, data_record: dict, result, model) -> dict:
    return {
        "stage": s.stage,
        "settings": asdict(s),
        "trainable": sorted({_group(n) for n, p in model.named_parameters() if p.requires_grad}),
        "from": None
        if prev is None
        else {
            "name": prev["name"],
            "files": prev["files"],
            "stage": prev.get("stage", {}).get("stage", "mid"),
        },
        "data": data_record,
        "valid_loss": {"before": result.initial_valid_loss, "after": result.final_valid_loss},
    }


def _manifest(name, prev, anchor_dir, config, s: StageSettings, cfg: TrainConfig, record, result) -> dict:
    prev = prev or {}
    return {
        "name": name,
        "description": prev.get("description", ""),
        "contact": prev.get("contact", ""),
        "license": prev.get("license", "proprietary: usage terms set by the owner"),
        "anchor": {
            "fingerprint": fingerprint(anchor_dir),
            "model_type": config.model_type,
            "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
        },
        "router_init": prev.get("router_init", s.router_init),
        "bias_init": 0.0,
        "training": {**asdict(cfg), "stage": s.stage, "z_loss": s.z_loss},
        "stage": record,
        "stages": [*prev.get("stages", []), record],
        "tokens_seen": result.tokens_seen,
        "seconds": result.seconds,
        "valid_loss": {"anchor": result.initial_valid_loss, "expert": result.final_valid_loss},
        "history": result.history,
        "dp": None,
    }


def _group(name: str) -> str:
    """A readable parameter group: 'owner FFN', 'owner router row', 'embeddings', 'attention', ..."""
    if ".mlp.experts.1." in name:
        return "owner FFN"
    if ".mlp.router.1." in name:
        return "owner router row"
    if ".mlp.router." in name:
        return "public router row"
    if ".mlp.experts.0." in name:
        return "anchor FFN"
    if name in EMBEDDINGS:
        return "embeddings and LM head"
    if "self_attn" in name and "norm" not in name:
        return "attention"
    return "norms"
