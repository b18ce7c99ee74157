"""The one training loop every flexmoe trainer uses: anchor pretraining, expert training, dense
baselines and router training differ only in which parameters are trainable and which extra loss
they add.

What it provides: AdamW with warmup + cosine, gradient clipping and accumulation, periodic evaluation,
a progress display (loss, tokens/s, ETA), checkpoints that resume bit-identically, bf16 autocast on
GPUs, and data parallelism through ``torchrun`` (DDP, or FSDP2 sharding with ``fsdp``; gloo on CPU, NCCL
on GPU), optionally with activation checkpointing. Checkpoints hold only
trainable tensors and optimiser state, in safetensors + JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from flexmoe import parallel
from flexmoe.errors import FlexmoeError
from flexmoe.fileio import atomic_dir, read_json, write_json
from flexmoe.parallel import as_like, full, load_full_


@dataclass
class TrainConfig:
    """Optimisation settings; serialised into checkpoints and manifests."""

    steps: int = 100
    batch_size: int = 8  # sequences per optimiser step, summed over ranks and accumulation
    grad_accum: int = 1
    seq_len: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    fsdp: bool = False  # shard with FSDP2 (flexmoe.parallel) instead of replicating with DDP
    activation_checkpointing: bool = False

    def lr_at(self, step: int) -> float:
        """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


@dataclass
class TrainResult:
    """What a run did: losses over time, tokens consumed, wall time."""

    history: list[dict] = field(default_factory=list)
    tokens_seen: int = 0
    seconds: float = 0.0
    final_valid_loss: float | None = None
    initial_valid_loss: float | None = None


# --------------------------------------------------------------------------------------------------
# Distributed set-up: the single-process path is the same code with world size 1.


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not launched by torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> torch.device:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def is_main() -> bool:
    return dist_info()[0] == 0


# --------------------------------------------------------------------------------------------------
# Batches: a seeded permutation per epoch, so the batch at step s is a pure function of (seed, s).
# That is what makes resume bit-identical and lets each rank take its own slice of the global batch.


def batch_indices(n_blocks: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the global batch used at ``step``."""
    per_epoch = max(1, n_blocks // batch_size)
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_blocks, generator=g)
    if n_blocks < batch_size:  # tiny corpora: repeat the permutation to fill a batch
        perm = perm.repeat(math.ceil(batch_size / n_blocks))
    return perm[pos * batch_size : (pos + 1) * batch_size]


def micro_batches(blocks: torch.Tensor, cfg: TrainConfig, step: int) -> Iterator[torch.Tensor]:
    """This rank's micro-batches of the global batch at ``step``."""
    rank, world = dist_info()
    idx = batch_indices(len(blocks), cfg.batch_size, step, cfg.seed)
    mine = idx.view(world, -1)[rank] if len(idx) % world == 0 else idx[rank::world]
    yield from (blocks[chunk] for chunk in mine.chunk(cfg.grad_accum))


# --------------------------------------------------------------------------------------------------
# Checkpoints: trainable tensors + AdamW state in safetensors, the rest in JSON.


def _optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = full(v.detach()).cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Whole trainable tensors (gathered from every rank when sharded: all ranks must call this)."""
    return {n: full(p.detach()).cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    ckpt: Path,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    cfg: TrainConfig,
    step: int,
    result,
    extra: dict | None = None,
) -> None:
    """Write a resumable checkpoint atomically (gathered on every rank, written by rank 0).

    ``extra`` (JSON) is stored in ``state.json`` under ``"extra"``, in the same atomic write as the
    weights: trainer-specific state such as the DP trainer's accountant inputs.
    """
    opt_tensors, opt_meta = _optimizer_to_files(opt)
    trainable = trainable_state(model)
    if not is_main():
        return
    with atomic_dir(ckpt, force=True) as tmp:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        write_json(
            tmp / "state.json",
            {"step": step, "config": asdict(cfg), "optimizer": opt_meta, "result": asdict(result)}
            | ({"extra": extra} if extra is not None else {}),
        )


def load_checkpoint(
    ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig
) -> tuple[int, TrainResult]:
    """Restore trainable tensors and optimiser state; refuse a checkpoint made with other settings."""
    state = read_json(ckpt / "state.json")
    saved = state["config"]
    saved["betas"] = tuple(saved["betas"])
    if saved != asdict(cfg):
        diff = sorted(k for k in saved if saved[k] != asdict(cfg).get(k))
        raise FlexmoeError(
            f"Checkpoint {ckpt} was made with different settings ({', '.join(diff)}).",
            "resume with the original settings, or pass --force to start over.",
        )
    params = dict(model.named_parameters())
    for name, t in load_file(str(ckpt / "trainable.safetensors")).items():
        load_full_(params[name], t)
    saved_opt = _optimizer_from_files(load_file(str(ckpt / "optimizer.safetensors")), state["optimizer"])
    ordered = [p for g in opt.param_groups for p in g["params"]]
    for idx, st in saved_opt["state"].items():  # sharded parameters need sharded moments
        st.update({k: as_like(ordered[idx], v) for k, v in st.items() if torch.is_tensor(v)})
    opt.load_state_dict(saved_opt)
    return state["step"], TrainResult(**state["result"])


# --------------------------------------------------------------------------------------------------
# Progress: one line per ``log_every`` steps, readable in a terminal and in CI logs alike.


class Progress:
    """Prints step, loss, tokens/s, learning rate and ETA."""

    def __init__(self, desc: str, total: int, quiet: bool):
        from rich.console import Console

        self.desc, self.total, self.quiet = desc, total, quiet or not is_main()
        self.console = Console(stderr=True, highlight=False)
        self.t0 = time.perf_counter()
        self.start_step = 0

    def start(self, step: int) -> None:
        self.start_step, self.t0 = step, time.perf_counter()

    def log(self, step: int, loss: float, tokens: int, lr: float, extra: str = "") -> None:
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.t0
        done = step + 1 - self.start_step
        eta = elapsed / max(1, done) * (self.total - step - 1)
        self.console.print(
            f"[bold]{self.desc}[/] step {step + 1}/{self.total}  loss {loss:.4f}  "
            f"{tokens / max(elapsed, 1e-9):,.0f} tok/s  lr {lr:.2e}  ETA {eta:4.0f}s {extra}"
        )

    def note(self, msg: str) -> None:
        if not self.quiet:
            self.console.print(msg)


# --------------------------------------------------------------------------------------------------


LossFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a batch of packed blocks (HF models shift labels themselves)."""
    return model(input_ids=batch, labels=batch).loss


def autocast(device: torch.device):
    """bf16 autocast on GPUs; full precision on CPU, where bf16 is slower and noisier."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    batch_size: int,
    max_batches: int | None = None,
    loss_fn: LossFn = lm_loss,
) -> float:
    """Mean next-token loss over (a prefix of) ``blocks``; every block has the same token count."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for i, start in enumerate(range(0, len(blocks), batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        b = blocks[start : start + batch_size].to(device)
        with autocast(device):
            total += loss_fn(model, b).float().item() * len(b)
        n += len(b)
    model.train(was_training)
    return total / max(n, 1)


def make_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over explicit parameter groups. Frozen parameters are never handed to the optimiser,
    so weight decay cannot touch them (Ai2's code decays "frozen" weights whose grads are zeroed)."""
    for g in groups:
        g.setdefault("weight_decay", cfg.weight_decay)
        g["params"] = [p for p in g["params"] if p.requires_grad]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise FlexmoeError("Nothing to train: every parameter is frozen.", "this is a bug; please report it.")
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=False)
    for g in opt.param_groups:  # each group's own peak, scaled by the schedule in set_lr_
        g["base_lr"] = g["lr"]
    return opt


def set_lr_(opt: torch.optim.Optimizer, cfg: TrainConfig, step: int) -> None:
    """The schedule's learning rate for ``step``, relative to each group's peak."""
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] / cfg.lr * cfg.lr_at(step)


def train(
    model: torch.nn.Module,
    train_blocks: torch.Tensor,
    valid_blocks: torch.Tensor,
    cfg: TrainConfig,
    *,
    param_groups: list[dict] | None = None,
    loss_fn: LossFn = lm_loss,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    after_step: Callable[[], None] | None = None,
    desc: str = "train",
    quiet: bool = False,
    device: torch.device | None = None,
) -> TrainResult:
    """Train ``model`` in place.

    ``param_groups`` selects what trains (default: every parameter with ``requires_grad``).
    ``checkpoint_dir`` enables checkpoints; with ``resume`` the run continues from the last one.
    ``stop_after`` ends the run after that many steps of this call (used to test interruption).
    ``after_step`` runs after every optimiser step (e.g. projecting router biases onto b <= 0).
    """
    device = device or next(model.parameters()).device
    rank, world = dist_info()
    if cfg.batch_size % (world * cfg.grad_accum) != 0:
        raise FlexmoeError(
            f"batch size {cfg.batch_size} is not divisible by world size x grad accumulation "
            f"({world} x {cfg.grad_accum}).",
            "choose --batch-size as a multiple of both.",
        )
    groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if cfg.activation_checkpointing:
        parallel.activation_checkpointing_(model)
    if cfg.fsdp:  # shard before the optimiser exists: it must hold the sharded parameters
        groups = parallel.shard(model, groups, bf16=device.type == "cuda")
    opt = make_optimizer(groups, cfg)
    params = [p for g in opt.param_groups for p in g["params"]]

    step, result = 0, TrainResult()
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    if ckpt and (ckpt / "state.json").exists():
        if not resume:
            raise FlexmoeError(
                f"An interrupted run left a checkpoint in {ckpt}.",
                "pass --resume to continue it, or --force to start over.",
            )
        step, result = load_checkpoint(ckpt, model, opt, cfg)

    ddp_model = model
    if world > 1 and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    progress = Progress(desc, cfg.steps, quiet)
    if step == 0:
        result.initial_valid_loss = evaluate(model, valid_blocks, cfg.batch_size, None, loss_fn)
        progress.note(f"{desc}: initial validation loss {result.initial_valid_loss:.4f}")
    else:
        progress.note(f"{desc}: resuming at step {step}/{cfg.steps}")
    progress.start(step)
    tokens_this_call, t_start = 0, time.perf_counter()
    model.train()
    steps_done = 0
    while step < cfg.steps:
        if stop_after is not None and steps_done >= stop_after:
            break
        set_lr_(opt, cfg, step)
        step_loss = torch.zeros((), device=device)
        mbs = list(micro_batches(train_blocks, cfg, step))
        for i, mb in enumerate(mbs):
            mb = mb.to(device, non_blocking=True)
            sync = i == len(mbs) - 1
            parallel.set_gradient_sync(model, sync)
            ctx = ddp_model.no_sync() if (ddp_model is not model and not sync) else contextlib.nullcontext()
            with ctx, autocast(device):
                loss = loss_fn(ddp_model, mb) / len(mbs)
            with ctx:
                loss.backward()
            step_loss += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        if world > 1:
            dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
        n_tok = cfg.batch_size * train_blocks.shape[1]
        result.tokens_seen += n_tok
        tokens_this_call += n_tok
        step += 1
        steps_done += 1
        loss_v = step_loss.item()
        if step % cfg.log_every == 0 or step == cfg.steps:
            progress.log(step - 1, loss_v, tokens_this_call, cfg.lr_at(step - 1))
            result.history.append({"step": step, "train_loss": loss_v, "tokens": result.tokens_seen})
        if step % cfg.eval_every == 0 or step == cfg.steps:
            v = evaluate(model, valid_blocks, cfg.batch_size, cfg.eval_batches, loss_fn)
            result.history.append({"step": step, "valid_loss": v, "tokens": result.tokens_seen})
            n_val = min(len(valid_blocks), cfg.eval_batches * cfg.batch_size)  # a quick subset
            progress.note(f"{desc}: step {step} validation loss (first {n_val} held-out blocks) {v:.4f}")
        if ckpt and (step % cfg.checkpoint_every == 0) and step < cfg.steps:
            save_checkpoint(ckpt, model, opt, cfg, step, result)
    result.seconds += time.perf_counter() - t_start
    if step >= cfg.steps:
        result.final_valid_loss = evaluate(model, valid_blocks, cfg.batch_size, None, loss_fn)
    elif ckpt:
        save_checkpoint(ckpt, model, opt, cfg, step, result)
    return result


def clear_checkpoint(ckpt: Path | None) -> None:
    """Remove a finished run's checkpoint (its content is now in the final output)."""
    if ckpt and ckpt.exists() and is_main():
        shutil.rmtree(ckpt, ignore_errors=True)


def history_json(result: TrainResult) -> str:
    return json.dumps(asdict(result), indent=2)
