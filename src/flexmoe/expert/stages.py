"""Post-training stages of an owner's expert with BAR's progressive unfreezing, each resuming from the
previous stage's package (``--from PKG``):

| stage | trains | data, loss |
|---|---|---|
| mid | owner FFN + owner router row (shared frozen, as FlexOlmo) | domain text, next-token + z-loss |
| sft | + embeddings and LM head (attention, norms, anchor FFN frozen) | domain + public chat, replies only |
| rl  | everything (attention, norms, anchor FFN, router) | tasks with checkable answers, GRPO (no KL) |

``freeze_shared`` reproduces FlexOlmo's frozen recipe in every stage: owner FFN and router row only.
The public router row never trains: it is the federation's fixed reference point, shared by every
package (``compose`` refuses packages that disagree on it).

Shared tensors that a stage changed leave the owner's machine as deltas from the anchor
(``shared_delta.safetensors`` in the package, hashed in the manifest); ``flexmoe.compose_shared``
merges them. All stages run against one anchor (the post-trained one), so the deltas of mid, sft and
rl accumulate in one coordinate system.

The pieces (parameter selector, data, loss) are small functions handed to ``flexmoe.training.train``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from flexmoe.errors import FlexmoeError

STAGES = ("mid", "sft", "rl")
EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")


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
    min_lr_ratio: float = 0.0  # decays to 0 (BAR SFT: linear to 0; the loop's schedule is cosine)
    public_mix: float = 0.3  # share of public (chat) sequences mixed into mid / sft
    z_loss: float = 1e-3
    router_init: str = "hidden"
    seed: int = 0
    grpo: dict = field(default_factory=dict)  # rl: flexmoe.expert.grpo.GRPOConfig fields


STAGE_DEFAULTS = {  # tiny-model values; BAR's (7B) are in the module docstring of the method notes
    "mid": {"lr": 2e-3, "steps": 120},
    "sft": {"lr": 1e-3, "steps": 80},
    "rl": {"lr": 1e-5, "steps": 20, "batch_size": 4, "min_lr_ratio": 1.0, "warmup_fraction": 0.0},
}


def settings_for(stage: str, **overrides) -> StageSettings:
    if stage not in STAGES:
        raise FlexmoeError(f"Unknown stage {stage!r}.", f"use one of {', '.join(STAGES)}.")
    given = {k: v for k, v in overrides.items() if v is not None}
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


def model_name(anchor_name: str) -> str:
    return anchor_name.replace(".mlp.", ".mlp.experts.0.") if ".mlp." in anchor_name else anchor_name


def shared_deltas(model, anchor_dir: Path) -> dict[str, torch.Tensor]:
    """Every shared (anchor) tensor the model changed, as ``trained - anchor`` in fp32."""
    from flexmoe.anchor import iter_tensors

    params = dict(model.named_parameters())
    out = {}
    for name, base in iter_tensors(anchor_dir):
        now = params.get(model_name(name))
        if now is None:
            continue
        d = now.detach().float().cpu() - base.float()
        if bool(d.any()):
            out[name] = d.contiguous()
    return out


@torch.no_grad()
def load_package_into(model, package: Path, anchor_fp: str) -> dict:
    """Put a package's owner FFN, router row, bias and shared deltas into a fresh 2-expert model built
    from the same anchor. Returns the package manifest."""
    from flexmoe.expert import package as pkg
    from flexmoe.moe import moe_blocks

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
        from safetensors.torch import load_file

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
    from flexmoe.anchor import fingerprint, load_anchor
    from flexmoe.moe import anchored_expert_model
    from flexmoe.router.embed import init_rows
    from flexmoe.tokenizer import load_tokenizer

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


def stage_data(
    s: StageSettings, data: Path, public: Path | None, tok
) -> tuple[torch.Tensor, torch.Tensor, list[str], dict]:
    """(train blocks, valid blocks, owner text for router init, data record) of a stage.

    mid: packed text; sft: sign-encoded chat blocks (``flexmoe.chat``); rl: task indices ``[n, 1]``."""
    from flexmoe.data import blocks_for, data_fingerprint, load_splits
    from flexmoe.expert.train import mixed_public_blocks

    if s.stage == "rl":
        from flexmoe.chat_data import read_tasks

        tasks = read_tasks(data / "rl.jsonl" if Path(data).is_dir() else data)
        idx = torch.arange(len(tasks)).view(-1, 1)
        text = [m["content"] for t in tasks for m in t["messages"]]
        return (
            idx,
            idx[: min(len(idx), 8)],
            text,
            {"tasks": len(tasks), "fingerprint": data_fingerprint(text)},
        )
    if s.stage == "mid":
        splits = load_splits([data])
        train, valid, own = (
            blocks_for(splits.train, tok, s.seq_len),
            blocks_for(splits.valid, tok, s.seq_len),
            splits.train,
        )
        pub = (lambda: blocks_for(load_splits([public]).train, tok, s.seq_len)) if public else None
    else:
        from flexmoe.chat import chat_blocks, chat_splits

        tr, va = chat_splits(data)
        train, valid = chat_blocks(tr, tok, s.seq_len), chat_blocks(va, tok, s.seq_len)
        own = [tok.apply_chat_template(c, tokenize=False) for c in tr]
        pub = (lambda: chat_blocks(chat_splits(public)[0], tok, s.seq_len)) if public else None
    record = {"fingerprint": data_fingerprint(own), "train_blocks": len(train), "public_mix": None}
    if pub is not None:
        extra = mixed_public_blocks(pub(), len(train), s.public_mix)
        train = torch.cat([train, extra])
        record["public_mix"] = {"fraction": s.public_mix, "blocks": len(extra)}
    return train, valid, own, record


def stage_loss(s: StageSettings, model, tasks_tok=None):
    """The loss function (step strategy) of a stage; rl returns a ``GRPOLoss``."""
    from flexmoe.moe import router_z_loss
    from flexmoe.training import lm_loss

    def z(device):
        return s.z_loss * router_z_loss(model).to(device)

    if s.stage == "mid":
        return lambda m, b: lm_loss(m, b) + z(b.device)
    if s.stage == "sft":
        from flexmoe.chat import chat_loss

        return lambda m, b: chat_loss(m, b) + z(b.device)
    from flexmoe.expert.grpo import GRPOConfig, GRPOLoss

    tasks, tok = tasks_tok
    return GRPOLoss(tasks, tok, GRPOConfig(**s.grpo))


# --------------------------------------------------------------------------------------------------
# The stage entry point


def train_stage(
    anchor: str | Path,
    data: Path,
    name: str,
    out: Path,
    settings: StageSettings,
    *,
    from_package: Path | None = None,
    public: Path | None = None,
    resume: bool = False,
    force: bool = False,
    quiet: bool = False,
) -> dict:
    """Run one post-training stage and write the package to ``out``. Returns the manifest."""
    from flexmoe.anchor import fingerprint, load_config, resolve
    from flexmoe.chat import require_chat_tokens
    from flexmoe.expert.package import expert_tensors, write_package
    from flexmoe.expert.train import check_dense_anchor, check_name
    from flexmoe.fileio import check_output_dir
    from flexmoe.moe import project_biases_
    from flexmoe.tokenizer import load_tokenizer
    from flexmoe.training import TrainConfig, clear_checkpoint, train

    s = settings
    check_name(name)
    out, work = Path(out), Path(out).parent / f".{Path(out).name}.work"
    if not resume:
        check_output_dir(out, force)
        if force:
            clear_checkpoint(work)
    anchor_dir = resolve(anchor)
    config = load_config(anchor_dir)
    check_dense_anchor(config)
    tok = load_tokenizer(anchor_dir)
    if s.stage != "mid":
        require_chat_tokens(tok, f"Anchor {anchor_dir}")
    train_blocks, valid_blocks, own_text, data_record = stage_data(s, Path(data), public, tok)
    torch.manual_seed(s.seed)
    model, prev = expert_model(
        anchor_dir, from_package, owner_docs=own_text, router_init=s.router_init, name=name
    )
    if prev is not None and prev["name"] != name:
        raise FlexmoeError(
            f"{from_package} belongs to expert {prev['name']!r}, not {name!r}.",
            f"pass --name {prev['name']}.",
        )
    params = select_parameters(model, s.stage, s.freeze_shared)
    allowed = {n for n, p in model.named_parameters() if p.requires_grad} | set(
        model_name(k) for k in ((prev or {}).get("shared_deltas") or {}).get("tensors", {})
    )
    cfg = TrainConfig(
        steps=s.steps,
        batch_size=s.batch_size,
        seq_len=s.seq_len,
        lr=s.lr,
        min_lr_ratio=s.min_lr_ratio,
        warmup_steps=max(1, round(s.steps * s.warmup_fraction)),
        eval_every=max(1, s.steps // 4),
        eval_batches=2,
        checkpoint_every=max(1, s.steps // 5),
        log_every=max(1, s.steps // 10),
        seed=s.seed,
    )
    tasks = None
    if s.stage == "rl":
        from flexmoe.chat_data import read_tasks

        tasks = read_tasks(Path(data) / "rl.jsonl" if Path(data).is_dir() else Path(data))
    loss_fn = stage_loss(s, model, (tasks, tok))
    result = train(
        model,
        train_blocks,
        valid_blocks,
        cfg,
        param_groups=[{"params": params}],
        loss_fn=loss_fn,
        checkpoint_dir=work / "checkpoint",
        resume=resume,
        after_step=lambda: project_biases_(model),
        desc=f"expert {name} ({s.stage}{', frozen shared' if s.freeze_shared else ''})",
        quiet=quiet,
    )
    if result.final_valid_loss is None:
        return {"finished": False}
    deltas = shared_deltas(model, anchor_dir)
    stray = sorted(n for n in deltas if model_name(n) not in allowed)
    if stray:
        raise FlexmoeError(
            f"Frozen shared tensors changed ({', '.join(stray[:3])}).", "this is a bug; please report it."
        )
    record = {
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
    manifest = {
        "name": name,
        "description": (prev or {}).get("description", ""),
        "contact": (prev or {}).get("contact", ""),
        "license": (prev or {}).get("license", "proprietary: usage terms set by the owner"),
        "anchor": {
            "fingerprint": fingerprint(anchor_dir),
            "model_type": config.model_type,
            "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
        },
        "router_init": (prev or {}).get("router_init", s.router_init),
        "bias_init": 0.0,
        "training": {**asdict(cfg), "stage": s.stage, "z_loss": s.z_loss},
        "stage": record,
        "stages": [*(prev or {}).get("stages", []), record],
        "tokens_seen": result.tokens_seen,
        "seconds": result.seconds,
        "valid_loss": {"anchor": result.initial_valid_loss, "expert": result.final_valid_loss},
        "history": result.history,
        "dp": None,
    }
    manifest = write_package(out, expert_tensors(model), manifest, force=True, shared_deltas=deltas)
    clear_checkpoint(work)
    return {"finished": True, **manifest}


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
