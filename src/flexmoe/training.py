"""The one training loop every flexmoe trainer uses: anchor pretraining, expert training (plain, DP,
DDP, FSDP2), router training, the baselines, and the post-training stages to come.

What differs between trainers is passed in as small named pieces (``Stage``):

- a **selector**: which parameters train, in which optimiser groups (``trainable_params``,
  ``decay_groups``, or any function of the model);
- a **step strategy**: how a step turns a batch into gradients (``LMStep``: a loss function such as
  LM loss + router z-loss, gradient accumulation, clipping; DP-SGD's per-sample clipping and noise is
  ``flexmoe.expert.privacy.DPStep``, the same loop with another strategy);
- a **batch source**: the data stream (``PackedBlocks``: packed token blocks; ``LabeledRows``: token
  ids with labels, ``IGNORE`` masking positions that carry no loss, e.g. chat SFT's user turns);
- a **schedule**: ``TrainConfig.schedule`` (warmup + cosine, warmup + linear to zero, constant).

The loop provides AdamW (fused on GPUs), periodic evaluation with early stopping on validation loss
(the best trainable weights are kept and restored), a progress display (loss, tokens/s, ETA),
checkpoints that resume bit-identically, bf16 autocast on GPUs with frozen weights stored in bf16,
per-decoder-layer ``torch.compile``, and data parallelism through ``torchrun`` (DDP, or FSDP2 sharding
with ``fsdp``; gloo on CPU, NCCL on GPU), optionally with activation checkpointing. Checkpoints hold
only trainable tensors and optimiser state, in safetensors + JSON: nothing is ever unpickled.
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
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from flexmoe import parallel
from flexmoe.errors import FlexmoeError
from flexmoe.fileio import atomic_dir, check_output_dir, read_json, write_json
from flexmoe.parallel import as_like, full, load_full_

IGNORE = -100  # label of positions that carry no loss (padding, prompts); cross_entropy's ignore_index
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    """The loop's optimisation settings; serialised into checkpoints and manifests."""

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
    schedule: str = "cosine"  # after warmup: "cosine" to lr * min_lr_ratio, "linear" to 0, "constant"
    early_stop: int = 0  # stop after this many evaluations without a better validation loss (0: off)
    compile: bool | None = None  # torch.compile each decoder layer; None: on CUDA only
    frozen_bf16: bool = True  # on CUDA, store frozen (non-trainable) weights in bf16
    fused: bool | None = None  # fused AdamW; None: on CUDA when not sharded

    def lr_at(self, step: int) -> float:
        """Linear warmup to ``lr``, then the schedule's decay over the remaining steps."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        if self.schedule == "constant":
            return self.lr
        if self.schedule == "linear":
            return self.lr * (1 - progress)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise FlexmoeError(f"Unknown schedule {self.schedule!r}.", f"use one of {', '.join(SCHEDULES)}.")
        if self.early_stop < 0:
            raise FlexmoeError(
                f"Early-stopping patience {self.early_stop} is negative.", "use 0 (off) or more."
            )


@dataclass
class TrainResult:
    """What a run did: losses over time, tokens consumed, wall time, and the best evaluation."""

    history: list[dict] = field(default_factory=list)
    tokens_seen: int = 0
    seconds: float = 0.0
    final_valid_loss: float | None = None
    initial_valid_loss: float | None = None
    best_step: int | None = None  # with early stopping: the step whose weights were kept
    best_valid_loss: float | None = None
    stopped_early: bool = False
    record: dict | None = None  # what the step strategy reports (DP: the privacy record)


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
# Batch sources: a seeded permutation per epoch, so the batch at step s is a pure function of
# (seed, s). That is what makes resume bit-identical and lets each rank take its own slice.


def batch_indices(n_blocks: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the global batch used at ``step``."""
    per_epoch = max(1, n_blocks // batch_size)
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_blocks, generator=g)
    if n_blocks < batch_size:  # tiny corpora: repeat the permutation to fill a batch
        perm = perm.repeat(math.ceil(batch_size / n_blocks))
    return perm[pos * batch_size : (pos + 1) * batch_size]


def _my_chunks(n: int, cfg: TrainConfig, step: int) -> list[torch.Tensor]:
    """This rank's micro-batch indices of the global batch at ``step``."""
    rank, world = dist_info()
    idx = batch_indices(n, cfg.batch_size, step, cfg.seed)
    mine = idx.view(world, -1)[rank] if len(idx) % world == 0 else idx[rank::world]
    return list(mine.chunk(cfg.grad_accum))


Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # packed ids (labels = ids), or (ids, labels)


@dataclass
class PackedBlocks:
    """Packed token blocks ``[n, seq_len]``: every position is predicted (pretraining, expert training)."""

    blocks: torch.Tensor

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def seq_len(self) -> int:
        return self.blocks.shape[1]

    def micro_batches(self, cfg: TrainConfig, step: int) -> list[torch.Tensor]:
        return [self.blocks[c] for c in _my_chunks(len(self.blocks), cfg, step)]


@dataclass
class LabeledRows:
    """Rows of token ids with their labels; label ``IGNORE`` marks positions without loss (chat SFT:
    everything but the assistant's turns, and padding)."""

    ids: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        if self.ids.shape != self.labels.shape:
            raise FlexmoeError(
                f"Token ids {tuple(self.ids.shape)} and labels {tuple(self.labels.shape)} differ in shape.",
                "give one label per token (IGNORE for positions without loss).",
            )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def seq_len(self) -> int:
        return self.ids.shape[1]

    def micro_batches(self, cfg: TrainConfig, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.ids[c], self.labels[c]) for c in _my_chunks(len(self.ids), cfg, step)]


class BatchSource(Protocol):
    def __len__(self) -> int: ...

    def micro_batches(self, cfg: TrainConfig, step: int) -> list[Batch]: ...


def to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, tuple):
        return tuple(t.to(device, non_blocking=True) for t in batch)
    return batch.to(device, non_blocking=True)


def rows_in(batch: Batch) -> int:
    return len(batch[0]) if isinstance(batch, tuple) else len(batch)


# --------------------------------------------------------------------------------------------------
# Selectors: which parameters train, as optimiser groups.

Selector = Callable[[torch.nn.Module], list[dict]]


def trainable_params(model: torch.nn.Module) -> list[dict]:
    """Every parameter with ``requires_grad``, in one group."""
    return [{"params": [p for p in model.parameters() if p.requires_grad]}]


def decay_groups(model: torch.nn.Module) -> list[dict]:
    """Pretraining: weight decay on matrices, none on embeddings, norms and biases."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def only(params: list[torch.nn.Parameter]) -> Selector:
    """Exactly these parameters (e.g. router rows)."""
    return lambda _model: [{"params": list(params)}]


# --------------------------------------------------------------------------------------------------
# Checkpoints: trainable tensors + AdamW state (+ the best weights so far) in safetensors, the rest
# in JSON.


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


def load_trainable_(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, t in tensors.items():
        load_full_(params[name], t)


@dataclass
class Snapshot:
    """What a checkpoint holds besides the model: where the run is and what the strategy keeps."""

    step: int
    result: TrainResult
    extra: dict | None = None  # strategy state (JSON), e.g. the DP accountant's inputs
    best: dict[str, torch.Tensor] | None = None  # early stopping: the best trainable weights so far


def save_checkpoint(
    ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig, snap: Snapshot
) -> None:
    """Write a resumable checkpoint atomically (gathered on every rank, written by rank 0)."""
    opt_tensors, opt_meta = _optimizer_to_files(opt)
    trainable = trainable_state(model)
    if not is_main():
        return
    with atomic_dir(ckpt, force=True) as tmp:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        if snap.best is not None:
            save_file(snap.best, str(tmp / "best.safetensors"))
        state = {
            "step": snap.step,
            "config": asdict(cfg),
            "optimizer": opt_meta,
            "result": asdict(snap.result),
        }
        write_json(tmp / "state.json", state | ({"extra": snap.extra} if snap.extra is not None else {}))


def checkpoint_extra(ckpt: Path) -> dict | None:
    """The strategy state stored with a checkpoint (None: there is none, or no checkpoint)."""
    state = Path(ckpt) / "state.json"
    return read_json(state).get("extra") if state.is_file() else None


def load_checkpoint(
    ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig
) -> Snapshot:
    """Restore trainable tensors and optimiser state; refuse a checkpoint made with other settings."""
    state = read_json(ckpt / "state.json")
    saved = state["config"]
    saved["betas"] = tuple(saved["betas"])
    if saved != asdict(cfg):
        diff = sorted(k for k in set(saved) | set(asdict(cfg)) if saved.get(k) != asdict(cfg).get(k))
        raise FlexmoeError(
            f"Checkpoint {ckpt} was made with different settings ({', '.join(diff)}).",
            "resume with the original settings, or pass --force to start over.",
        )
    load_trainable_(model, load_file(str(ckpt / "trainable.safetensors")))
    saved_opt = _optimizer_from_files(load_file(str(ckpt / "optimizer.safetensors")), state["optimizer"])
    ordered = [p for g in opt.param_groups for p in g["params"]]
    for idx, st in saved_opt["state"].items():  # sharded parameters need sharded moments
        st.update({k: as_like(ordered[idx], v) for k, v in st.items() if torch.is_tensor(v)})
    opt.load_state_dict(saved_opt)
    best = load_file(str(ckpt / "best.safetensors")) if (ckpt / "best.safetensors").is_file() else None
    return Snapshot(state["step"], TrainResult(**state["result"]), state.get("extra"), best)


# --------------------------------------------------------------------------------------------------
# Progress: one line per ``log_every`` steps, readable in a terminal and in CI logs alike.


class Progress:
    """Prints step, loss, tokens/s, learning rate and ETA."""

    def __init__(self, desc: str, total: int, quiet: bool):
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
            f"{tokens / max(elapsed, 1e-9):,.0f} tok/s  lr {lr:.2e}  ETA {eta:4.0f}s {extra}",
            soft_wrap=True,  # one line per step in logs too (a non-terminal console is 80 columns)
        )

    def note(self, msg: str) -> None:
        if not self.quiet:
            self.console.print(msg)


# --------------------------------------------------------------------------------------------------
# Losses, precision, evaluation, optimiser.

LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """bf16 (autocast) up to fp32 for losses; fp32 and a float64 model's values (cpu_dtype) unchanged."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def lm_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy, the mean over every predicted token; ``IGNORE`` labels carry no loss."""
    ids, labels = batch if isinstance(batch, tuple) else (batch, batch)
    # No KV cache: building one in evaluation makes each compiled layer guard on its layer index (one
    # recompilation per layer, past torch's limit, after which every layer ran uncompiled).
    # HF's loss (labels=) computed here, because HF rounds a float64 model's logits to fp32. As in HF,
    # the labels shift (the last position predicts nothing), not the logits: no copy of the logits.
    logits = at_least_fp32(model(input_ids=ids, use_cache=False).logits)
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE).to(logits.device)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def autocast(device: torch.device):
    """bf16 autocast on GPUs; full precision on CPU, where bf16 is slower and noisier."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


CPU_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def cpu_dtype(name: str) -> torch.dtype:
    """The dtype a trainer's model computes in on CPU (GPUs: bf16 autocast whatever this says).
    ``float32`` by default; ``float64`` for reference runs: float32 kernels sum in an order that
    depends on the CPU (AVX2 or AVX-512, threads), and over tens of steps their rounding differences
    grow into loss differences above 1e-5, while float64 keeps them below 1e-9
    (tests/fixtures/make_loss_curves.py). flexmoe's own computations (losses, router rows, owner
    experts, router init) follow the model's dtype; HF's OLMo 2 still computes RMSNorm and RoPE in fp32."""
    if name not in CPU_DTYPES:
        raise FlexmoeError(f"CPU dtype {name!r} is not supported.", f"use one of {', '.join(CPU_DTYPES)}.")
    return CPU_DTYPES[name]


def _valid_batches(valid: Batch, batch_size: int) -> Iterator[Batch]:
    ids, labels = valid if isinstance(valid, tuple) else (valid, None)
    for start in range(0, len(ids), batch_size):
        sl = slice(start, start + batch_size)
        yield ids[sl] if labels is None else (ids[sl], labels[sl])


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    valid: Batch,
    batch_size: int,
    max_batches: int | None = None,
    loss_fn: LossFn = lm_loss,
) -> float:
    """Mean loss per row over (a prefix of) ``valid``: packed blocks, or ``(ids, labels)`` rows."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for i, b in enumerate(_valid_batches(valid, batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        with autocast(device):
            total += loss_fn(model, to_device(b, device)).item() * rows_in(b)
        n += rows_in(b)
    model.train(was_training)
    return total / max(n, 1)


def make_optimizer(groups: list[dict], cfg: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over explicit parameter groups. Frozen parameters are never handed to the optimiser,
    so weight decay cannot touch them (Ai2's code decays "frozen" weights whose grads are zeroed).
    ``fused`` (CUDA): one kernel for every parameter; otherwise the per-parameter loop, whose
    results on CPU are the reference the loss-curve test holds the loop to."""
    for g in groups:
        g.setdefault("weight_decay", cfg.weight_decay)
        g["params"] = [p for p in g["params"] if p.requires_grad]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise FlexmoeError("Nothing to train: every parameter is frozen.", "this is a bug; please report it.")
    kind = {"fused": True} if fused else {"foreach": False}
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **kind)
    for g in opt.param_groups:  # each group's own peak, scaled by the schedule in set_lr_
        g["base_lr"] = g["lr"]
    return opt


def set_lr_(opt: torch.optim.Optimizer, cfg: TrainConfig, step: int) -> None:
    """The schedule's learning rate for ``step``, relative to each group's peak."""
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] / cfg.lr * cfg.lr_at(step)


# --------------------------------------------------------------------------------------------------
# GPU-side model preparation: per-layer compile, bf16 frozen weights.


def compile_layers_(model: torch.nn.Module, backend: str = "inductor") -> None:
    """``torch.compile`` each decoder layer (in place). Per layer rather than the whole model: one
    graph reused by every layer compiles fast, and it was faster than whole-model compile on GPUs."""
    for layer in parallel.decoder_layers(model):
        layer.compile(backend=backend)


def frozen_to_bf16_(model: torch.nn.Module) -> int:
    """Store frozen floating-point weights in bf16 (autocast computes in bf16 anyway); returns how
    many tensors changed. Trainable weights keep their fp32 master copies."""
    n = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != torch.bfloat16:
            p.data = p.data.to(torch.bfloat16)
            n += 1
    return n


# --------------------------------------------------------------------------------------------------
# Step strategies: how a step turns a batch into gradients.


@dataclass
class LoopState:
    """What a strategy sees of the loop it runs in."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    cfg: TrainConfig
    device: torch.device
    params: list[torch.nn.Parameter]


@dataclass
class StepOut:
    loss: float  # the step's training loss (shown; recorded unless the strategy says otherwise)
    tokens: int


class StepStrategy(Protocol):
    record_train_loss: bool  # DP: the training loss is not privatised, so it is shown, never recorded
    supports_compile: bool
    loss_fn: LossFn  # also the validation loss

    def bind(self, loop: LoopState, source: BatchSource) -> None: ...
    def check_resume(self, ckpt: Path, extra: dict | None) -> None: ...
    def start(self) -> None: ...
    def last_step(self) -> int: ...
    def describe(self) -> str | None: ...
    def gradients(self, step: int) -> StepOut: ...
    def optimizer(self) -> torch.optim.Optimizer: ...
    def log_extra(self, step: int) -> str: ...
    def extra(self, step: int) -> dict | None: ...
    def close(self) -> None: ...
    def finish(self, step: int, result: TrainResult) -> dict | None: ...


class LMStep:
    """Plain training: ``loss_fn`` (default: LM loss) over this rank's micro-batches, gradients
    accumulated (and averaged over ranks by DDP or FSDP2), clipped to ``cfg.grad_clip``."""

    record_train_loss = True
    supports_compile = True

    def __init__(self, loss_fn: LossFn = lm_loss):
        self.loss_fn = loss_fn

    def bind(self, loop: LoopState, source: BatchSource) -> None:
        self.loop, self.source, self.ddp = loop, source, loop.model

    def check_resume(self, ckpt: Path, extra: dict | None) -> None:
        if (extra or {}).get("dp") is not None:  # continuing without DP would lose its accounting
            raise FlexmoeError(
                f"Checkpoint {ckpt} belongs to a DP run.",
                "resume with the same --dp-* options, or pass --force to start over.",
            )

    def start(self) -> None:
        loop = self.loop
        if dist_info()[1] > 1 and not loop.cfg.fsdp:
            ids = [loop.device.index] if loop.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(loop.model, device_ids=ids)

    def last_step(self) -> int:
        return self.loop.cfg.steps

    def describe(self) -> str | None:
        return None

    def gradients(self, step: int) -> StepOut:
        loop = self.loop
        # float64: exact for one fp32 loss, and a float64 model's loss keeps its precision
        step_loss = torch.zeros((), device=loop.device, dtype=torch.float64)
        mbs = self.source.micro_batches(loop.cfg, step)
        for i, mb in enumerate(mbs):
            sync = i == len(mbs) - 1
            parallel.set_gradient_sync(loop.model, sync)
            no_sync = self.ddp is not loop.model and not sync
            ctx = self.ddp.no_sync() if no_sync else contextlib.nullcontext()
            with ctx, autocast(loop.device):
                loss = self.loss_fn(self.ddp, to_device(mb, loop.device)) / len(mbs)
            with ctx:
                loss.backward()
            step_loss += loss.detach()
        if loop.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(loop.params, loop.cfg.grad_clip)
        if dist_info()[1] > 1:
            dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
        return StepOut(step_loss.item(), loop.cfg.batch_size * self.source.seq_len)

    def optimizer(self) -> torch.optim.Optimizer:
        return self.loop.opt

    def log_extra(self, step: int) -> str:
        return ""

    def extra(self, step: int) -> dict | None:
        return None

    def close(self) -> None:
        pass

    def finish(self, step: int, result: TrainResult) -> dict | None:
        return None


# --------------------------------------------------------------------------------------------------
# The loop.


@dataclass
class Stage:
    """What one trainer plugs into the loop."""

    source: BatchSource  # training batches
    valid: Batch  # validation rows: packed blocks, or (ids, labels)
    strategy: StepStrategy = field(default_factory=LMStep)
    select: Selector = trainable_params
    after_step: Callable[[], None] | None = None  # e.g. projecting router biases onto b <= 0
    desc: str = "train"


@dataclass
class RunOptions:
    """How this call runs (not part of the training settings: never in checkpoints or manifests)."""

    checkpoint_dir: Path | None = None
    resume: bool = False
    stop_after: int | None = None  # end after this many steps of this call (tests of interruption)
    quiet: bool = False
    device: torch.device | None = None


class EarlyStopping:
    """Keeps the best trainable weights by validation loss; says when ``patience`` evaluations in a
    row brought no improvement."""

    def __init__(self, patience: int, result: TrainResult, best: dict[str, torch.Tensor] | None):
        self.patience, self.result, self.best = patience, result, best

    def observe(self, model: torch.nn.Module, step: int, loss: float) -> bool:
        """Record an evaluation; True when training should stop."""
        if not self.patience:
            return False
        r = self.result
        if r.best_valid_loss is None or loss < r.best_valid_loss:
            # A copy: on CPU, trainable_state's tensors share storage with the live parameters.
            best = {n: t.clone() for n, t in trainable_state(model).items()}
            r.best_step, r.best_valid_loss, self.best = step, loss, best
            return False
        since = [h for h in r.history if "valid_loss" in h and h["step"] > r.best_step]
        return len(since) >= self.patience

    def restore(self, model: torch.nn.Module, step: int) -> None:
        if self.best is not None and self.result.best_step != step:
            load_trainable_(model, self.best)


def _prepare(model: torch.nn.Module, cfg: TrainConfig, stage: Stage, device: torch.device) -> LoopState:
    """Model transforms (activation checkpointing, compile, bf16 frozen weights, FSDP2), then AdamW."""
    cfg.validate()
    world = dist_info()[1]
    if cfg.batch_size % (world * cfg.grad_accum) != 0:
        raise FlexmoeError(
            f"batch size {cfg.batch_size} is not divisible by world size x grad accumulation "
            f"({world} x {cfg.grad_accum}).",
            "choose --batch-size as a multiple of both.",
        )
    groups = stage.select(model)
    if cfg.activation_checkpointing:
        parallel.activation_checkpointing_(model)
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    if use_compile and not stage.strategy.supports_compile:
        if cfg.compile:
            raise FlexmoeError("This training step does not support torch.compile.", "drop --compile.")
        use_compile = False
    if use_compile:
        compile_layers_(model)
    if device.type == "cuda" and cfg.frozen_bf16 and not cfg.fsdp:
        frozen_to_bf16_(model)
    if cfg.fsdp:  # shard before the optimiser exists: it must hold the sharded parameters
        groups = parallel.shard(model, groups, bf16=device.type == "cuda")
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda" and not cfg.fsdp
    opt = make_optimizer(groups, cfg, fused=fused)
    params = [p for g in opt.param_groups for p in g["params"]]
    return LoopState(model, opt, cfg, device, params)


def _restore(loop: LoopState, strategy: StepStrategy, run: RunOptions) -> Snapshot:
    """The checkpoint to continue from, or a fresh start."""
    ckpt = Path(run.checkpoint_dir) if run.checkpoint_dir else None
    if not (ckpt and (ckpt / "state.json").exists()):
        return Snapshot(0, TrainResult())
    if not run.resume:
        raise FlexmoeError(
            f"An interrupted run left a checkpoint in {ckpt}.",
            "pass --resume to continue it, or --force to start over.",
        )
    strategy.check_resume(ckpt, checkpoint_extra(ckpt))
    return load_checkpoint(ckpt, loop.model, loop.opt, loop.cfg)


def _start_note(loop: LoopState, stage: Stage, snap: Snapshot, progress: Progress, last: int) -> None:
    desc = stage.desc
    if snap.step == 0:
        v = evaluate(loop.model, stage.valid, loop.cfg.batch_size, None, stage.strategy.loss_fn)
        snap.result.initial_valid_loss = v
        progress.note(f"{desc}: initial validation loss {v:.4f}")
    else:
        progress.note(f"{desc}: resuming at step {snap.step}/{last}")
    if (text := stage.strategy.describe()) is not None:
        progress.note(f"{desc}: {text}")


def train(
    model: torch.nn.Module, cfg: TrainConfig, stage: Stage, run: RunOptions | None = None
) -> TrainResult:
    """Train ``model`` in place with ``stage``'s pieces and return what happened.

    ``run.checkpoint_dir`` enables checkpoints; with ``run.resume`` the run continues from the last
    one. The result's ``final_valid_loss`` is None when the run stopped before its end (``stop_after``).
    """
    run = run or RunOptions()
    device = run.device or next(model.parameters()).device
    strategy = stage.strategy
    loop = _prepare(model, cfg, stage, device)
    strategy.bind(loop, stage.source)
    snap = _restore(loop, strategy, run)
    strategy.start()
    last = strategy.last_step()
    progress = Progress(stage.desc, last, run.quiet)
    _start_note(loop, stage, snap, progress, last)
    stopper = EarlyStopping(cfg.early_stop, snap.result, snap.best)
    t_start = time.perf_counter()
    try:
        step, stopped = _run_steps(loop, stage, run, snap, stopper, progress)
    finally:
        strategy.close()
    result = snap.result
    result.seconds += time.perf_counter() - t_start
    if step >= last or stopped:
        result.stopped_early = stopped
        stopper.restore(model, step)
        result.final_valid_loss = evaluate(model, stage.valid, cfg.batch_size, None, strategy.loss_fn)
    elif run.checkpoint_dir:
        _save(loop, run, stage, Snapshot(step, result, strategy.extra(step), stopper.best))
    result.record = strategy.finish(step, result)
    return result


def _save(loop: LoopState, run: RunOptions, stage: Stage, snap: Snapshot) -> None:
    save_checkpoint(Path(run.checkpoint_dir), loop.model, loop.opt, loop.cfg, snap)


def _run_steps(
    loop: LoopState, stage: Stage, run: RunOptions, snap: Snapshot, stopper: EarlyStopping, progress: Progress
) -> tuple[int, bool]:
    """Optimiser steps until the last one, ``stop_after``, or early stopping; returns (step, stopped)."""
    cfg, strategy, result = loop.cfg, stage.strategy, snap.result
    step, last, tokens_this_call = snap.step, strategy.last_step(), 0
    progress.start(step)
    loop.model.train()
    opt = strategy.optimizer()
    for done in range(last - step):
        if run.stop_after is not None and done >= run.stop_after:
            break
        set_lr_(loop.opt, cfg, step)
        out = strategy.gradients(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if stage.after_step is not None:
            stage.after_step()
        result.tokens_seen += out.tokens
        tokens_this_call += out.tokens
        step += 1
        if step % cfg.log_every == 0 or step == last:
            progress.log(step - 1, out.loss, tokens_this_call, cfg.lr_at(step - 1), strategy.log_extra(step))
            if strategy.record_train_loss:
                result.history.append({"step": step, "train_loss": out.loss, "tokens": result.tokens_seen})
        stop = False
        if step % cfg.eval_every == 0 or step == last:
            v = evaluate(loop.model, stage.valid, cfg.batch_size, cfg.eval_batches, strategy.loss_fn)
            result.history.append({"step": step, "valid_loss": v, "tokens": result.tokens_seen})
            n_val = min(len(stage.valid), cfg.eval_batches * cfg.batch_size)  # a quick subset
            progress.note(
                f"{stage.desc}: step {step} validation loss (first {n_val} held-out blocks) {v:.4f}"
            )
            stop = stopper.observe(loop.model, step, v)
        if stop:
            progress.note(f"{stage.desc}: early stop at step {step}; keeping step {result.best_step}")
            return step, True
        if run.checkpoint_dir and step % cfg.checkpoint_every == 0 and step < last:
            _save(loop, run, stage, Snapshot(step, result, strategy.extra(step), stopper.best))
    return step, False


def claim_work_dir(out: Path, resume: bool, force: bool) -> Path:
    """The work directory of a run writing ``out`` (``.<out>.work`` beside it). A fresh run checks that
    ``out`` is free (or ``force``) and, with ``force``, drops an interrupted run's checkpoint."""
    out = Path(out)
    work = out.parent / f".{out.name}.work"
    if not resume:
        check_output_dir(out, force)
        if force:
            clear_checkpoint(work)
    return work


def clear_checkpoint(ckpt: Path | None) -> None:
    """Remove a finished run's checkpoint (its content is now in the final output)."""
    if ckpt and ckpt.exists() and is_main():
        shutil.rmtree(ckpt, ignore_errors=True)


def history_json(result: TrainResult) -> str:
    return json.dumps(asdict(result), indent=2)
