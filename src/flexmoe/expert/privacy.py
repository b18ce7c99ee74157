"""Differential privacy for expert training: DP-SGD through Opacus on the owner's trainable tensors.

Only the owner's FFN copy, its router rows and biases train (``anchored_expert_model``), so only those
get per-sample gradients. Each privacy unit (a training sequence, or a whole document) is sampled
independently with probability ``q`` at every step (Poisson sampling, what the accountant assumes),
its gradient is clipped to ``max_grad_norm``, and Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm`` is added to the sum. Opacus does the per-sample gradients, the
clipping, the noise and the accounting; this module supplies what flexmoe's model needs:

- a per-sample gradient rule for ``RouterRow`` (its bias is straight-through, so its per-sample
  gradient is that of a linear bias) and checks that every trainable layer sees ``[batch, seq, hidden]``
  inputs: a layer that saw flattened tokens would be clipped per token, with no error from Opacus;
- the noise multiplier derived from (epsilon, delta, sampling rate, planned steps) by Opacus'
  ``get_noise_multiplier``, and a loop that never takes a step past the budget;
- secret randomness: sampling and noise come from a seed drawn from the operating system, kept only
  in the owner's checkpoint (so a resumed run is the same run) and never in the package.

The guarantee covers the owner's training data as seen through the expert package's weights. It does
not cover the manifest's handful of numbers computed on the data outside DP-SGD (validation losses on
held-out data, the document count, the data fingerprint), and it protects one unit: a secret repeated
in k units gets group privacy, roughly k times epsilon.
"""

from __future__ import annotations

import contextlib
import functools
import math
import secrets
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flexmoe.data import tokenize
from flexmoe.errors import FlexmoeError
from flexmoe.moe import RouterRow, moe_blocks
from flexmoe.router_init import load_published
from flexmoe.training import StepOut, at_least_fp32, autocast, dist_info

UNITS = ("sequence", "document")
ACCOUNTANTS = ("rdp", "prv")
CLIPPING = ("auto", "hooks", "functorch", "ghost")
IGNORE = -100  # label of padding positions (document units); cross_entropy's default ignore_index


@dataclass
class DPSettings:
    """What the owner asks for; serialised into checkpoints and (resolved) into the manifest."""

    epsilon: float
    delta: float | None = None  # None: 1 / (10 N), N = number of the owner's privacy units
    max_grad_norm: float = 1.0
    unit: str = "sequence"  # "sequence": one training sequence; "document": one whole document
    accountant: str = "rdp"  # "rdp" or "prv" (Opacus accountants)
    clipping: str = "auto"  # "auto" (hooks; ghost where per-sample gradients would not fit), or one of
    # "hooks", "functorch", "ghost"
    noise_multiplier: float | None = None  # fix sigma instead of deriving it; training stops at the budget
    physical_batch_size: int | None = None  # rows per forward/backward (memory); None: the expected batch
    noise_seed: int | None = None  # for tests only: a known seed makes the noise known to whoever has it

    def validate(self) -> None:
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise FlexmoeError(
                f"--dp-epsilon {self.epsilon} is not a positive finite number.", "use e.g. --dp-epsilon 8."
            )
        if self.delta is not None and not 0 < self.delta < 1:
            raise FlexmoeError(f"--dp-delta {self.delta} is not between 0 and 1.", "use e.g. 1e-6.")
        if not self.max_grad_norm > 0:
            raise FlexmoeError(f"--dp-max-grad-norm {self.max_grad_norm} must be > 0.", "use e.g. 1.0.")
        for value, allowed, opt in (
            (self.unit, UNITS, "--dp-unit"),
            (self.accountant, ACCOUNTANTS, "--dp-accountant"),
            (self.clipping, CLIPPING, "--dp-clipping"),
        ):
            if value not in allowed:
                raise FlexmoeError(f"{opt} {value!r} is not known.", f"use one of {', '.join(allowed)}.")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise FlexmoeError(f"Noise multiplier {self.noise_multiplier} must be > 0.", "use e.g. 1.0.")
        if self.physical_batch_size is not None and self.physical_batch_size < 1:
            raise FlexmoeError("The physical batch size must be at least 1.", "use e.g. 8.")


DPConfig = DPSettings  # the name before the settings were unified (kept for callers)


def require_opacus():
    """Import Opacus, or say how to install it (it is the optional ``dp`` extra)."""
    try:
        import opacus
    except ImportError as e:
        raise FlexmoeError(
            "Differential privacy needs Opacus, which is not installed.", "pip install 'flexmoe[dp]'"
        ) from e
    return opacus


# --------------------------------------------------------------------------------------------------
# Accounting: Opacus computes sigma and epsilon; flexmoe only decides when to stop.


@dataclass
class DPPlan:
    """The accountant's decision before training: how much noise, how many steps the budget allows."""

    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    max_steps: int  # steps whose epsilon stays within the target (= planned unless sigma was fixed)
    epsilon: float  # the target
    delta: float
    accountant: str
    private_units: int  # the owner's units (defines the default delta)
    sampled_units: int  # every unit the sampler draws from, public ones included
    expected_batch_size: int

    def spent(self, steps: int) -> float:
        """Epsilon after ``steps`` steps of this plan."""
        return epsilon_after(self.accountant, self.noise_multiplier, self.sample_rate, steps, self.delta)


def default_delta(private_units: int) -> float:
    """An order of magnitude below 1/N: a delta near 1/N would allow publishing one unit outright."""
    return 1.0 / (10 * max(1, private_units))


def rdp_orders() -> list[float]:
    """Opacus' default RDP orders plus larger ones: with few steps or a large epsilon the best order
    lies beyond Opacus' largest (63), and the bound would be looser than it needs to be."""
    from opacus.accountants import RDPAccountant

    return list(RDPAccountant.DEFAULT_ALPHAS) + [80, 96, 128, 192, 256, 384, 512, 1024]


def accountant_kwargs(accountant: str) -> dict:
    return {"alphas": rdp_orders()} if accountant == "rdp" else {}


@functools.lru_cache(maxsize=64)
def _rdp_one_step(sample_rate: float, noise_multiplier: float) -> tuple[float, ...]:
    from opacus.accountants.analysis.rdp import compute_rdp

    with _quiet_opacus():
        return tuple(
            compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=rdp_orders())
        )


@contextlib.contextmanager
def _quiet_opacus():
    """Silence two warnings that are expected here: the RDP optimum at the largest order (the search
    already goes to 1024), and the full backward hook on layers whose inputs need no gradient (the
    first layer's: the anchor below it is frozen)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


def epsilon_after(
    accountant: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float
) -> float:
    """Epsilon spent after ``steps`` steps, computed by Opacus' accountant."""
    require_opacus()
    from opacus.accountants import create_accountant

    if steps <= 0:
        return 0.0
    if accountant == "rdp":
        # What RDPAccountant computes for a one-entry history (compute_rdp(steps) is steps x one
        # step's RDP), with the per-step vector cached: progress lines and budget searches stay cheap.
        from opacus.accountants.analysis.rdp import get_privacy_spent

        rdp = [r * steps for r in _rdp_one_step(sample_rate, noise_multiplier)]
        return float(get_privacy_spent(orders=rdp_orders(), rdp=rdp, delta=delta)[0])
    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    with _quiet_opacus():
        return float(acc.get_epsilon(delta=delta, **accountant_kwargs(accountant)))


def make_plan(
    dp: DPSettings, *, private_units: int, sampled_units: int, batch_size: int, steps: int
) -> DPPlan:
    """Derive sigma for (epsilon, delta) over ``steps`` steps at rate ``batch_size / sampled_units``;
    refuse settings that cannot train (too small an epsilon, a batch larger than the data)."""
    require_opacus()
    from opacus.accountants.utils import get_noise_multiplier

    delta = _check_plan(dp, private_units, sampled_units, batch_size, steps)
    q = batch_size / sampled_units
    too_small = FlexmoeError(
        f"--dp-epsilon {dp.epsilon:g} is too small for even one training step at sampling rate {q:.3g} "
        f"and delta {delta:.2g} ({dp.accountant} accountant).",
        "raise --dp-epsilon, or lower --batch-size (a smaller sampling rate spends less per step).",
    )
    if dp.noise_multiplier is None:
        try:
            with _quiet_opacus():
                sigma = get_noise_multiplier(
                    target_epsilon=dp.epsilon,
                    target_delta=delta,
                    sample_rate=q,
                    steps=steps,
                    accountant=dp.accountant,
                    epsilon_tolerance=0.01 * dp.epsilon,
                    **accountant_kwargs(dp.accountant),
                )
        except ValueError as e:
            raise too_small from e
        max_steps = steps
    else:
        sigma = dp.noise_multiplier
        max_steps = _max_steps(dp.accountant, sigma, q, steps, delta, dp.epsilon)
        if max_steps == 0:
            raise too_small
    return DPPlan(
        noise_multiplier=float(sigma),
        sample_rate=q,
        planned_steps=steps,
        max_steps=max_steps,
        epsilon=dp.epsilon,
        delta=delta,
        accountant=dp.accountant,
        private_units=private_units,
        sampled_units=sampled_units,
        expected_batch_size=batch_size,
    )


def _check_plan(dp: DPSettings, private_units: int, sampled_units: int, batch_size: int, steps: int) -> float:
    """Refuse settings that cannot train; returns delta (the default: 1 / (10 N))."""
    dp.validate()
    if private_units < 1:
        raise FlexmoeError("There are no privacy units in the training data.", "add training data.")
    if not 1 <= batch_size <= sampled_units:
        raise FlexmoeError(
            f"Expected batch size {batch_size} is incompatible with the data: Poisson sampling draws each "
            f"of the {sampled_units} {dp.unit}s with probability batch/units, which must be in (0, 1].",
            f"use --batch-size between 1 and {sampled_units} (or add data).",
        )
    if steps < 1:
        raise FlexmoeError("DP training needs at least one step.", "use --steps 1 or more.")
    delta = dp.delta if dp.delta is not None else default_delta(private_units)
    if delta >= 1.0 / private_units:
        raise FlexmoeError(
            f"--dp-delta {delta:g} is not below 1/N = {1 / private_units:g} ({private_units} {dp.unit}s): "
            "such a delta allows a mechanism that publishes some units verbatim.",
            f"use --dp-delta {default_delta(private_units):.1g} or smaller (the default).",
        )
    return delta


def _max_steps(accountant: str, sigma: float, q: float, steps: int, delta: float, epsilon: float) -> int:
    """Largest step count in [0, steps] whose epsilon is within the target (epsilon grows with steps)."""
    lo, hi = 0, steps
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if epsilon_after(accountant, sigma, q, mid, delta) <= epsilon:
            lo = mid
        else:
            hi = mid - 1
    return lo


# --------------------------------------------------------------------------------------------------
# Privacy units and Poisson sampling.


@dataclass
class Units:
    """Training rows grouped into privacy units; unit ``u`` owns rows ``offsets[u]:offsets[u + 1]``.

    Sequence units are packed blocks (one row each). Document units are each document's own rows
    (never packed with another document; the last row right-padded with label ``IGNORE``). The first
    ``private`` units are the owner's; the rest are public data mixed in.
    """

    rows: torch.Tensor
    labels: torch.Tensor
    offsets: torch.Tensor
    private: int
    kind: str

    def __len__(self) -> int:
        return len(self.offsets) - 1


def sequence_units(blocks: torch.Tensor, private: int) -> Units:
    return Units(blocks, blocks, torch.arange(len(blocks) + 1), private, "sequence")


def document_units(docs: list[list[int]], seq_len: int, pad_id: int, private: int) -> Units:
    """One unit per document: its tokens cut into rows of ``seq_len``, the last one padded."""
    rows, labels, offsets, kept_private = [], [], [0], 0
    for i, ids in enumerate(docs):
        chunks = [ids[s : s + seq_len] for s in range(0, len(ids), seq_len)]
        chunks = [c for c in chunks if len(c) >= 2]  # a row needs a next token to predict
        if not chunks:
            continue
        for c in chunks:
            pad = seq_len - len(c)
            rows.append(c + [pad_id] * pad)
            labels.append(c + [IGNORE] * pad)
        offsets.append(offsets[-1] + len(chunks))
        kept_private += i < private
    if not rows:
        raise FlexmoeError("No document has two or more tokens.", "add training data.")
    return Units(torch.tensor(rows), torch.tensor(labels), torch.tensor(offsets), kept_private, "document")


def poisson_batch(units: Units, q: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Every unit joins with probability ``q``, independently; a joining unit gives one of its rows,
    chosen uniformly, so each row of the batch belongs to a different unit (per-row clipping is
    per-unit clipping)."""
    chosen = (torch.rand(len(units), generator=g) < q).nonzero(as_tuple=True)[0]
    start, count = units.offsets[chosen], units.offsets[chosen + 1] - units.offsets[chosen]
    pick = start + (torch.rand(len(chosen), generator=g) * count).long().clamp_max(count - 1)
    return units.rows[pick], units.labels[pick]


def _seed(secret: int, step: int, stream: int) -> int:
    return (secret * 1_000_003 + step * 7 + stream) % (2**63 - 1)


# --------------------------------------------------------------------------------------------------
# What Opacus needs from flexmoe's model.

_REGISTERED = False


def register_grad_samplers() -> None:
    """Per-sample gradients of ``RouterRow`` (``logit = w.x + nonpositive(b)``; the straight-through
    bias has the gradient of a plain bias). Without this Opacus would fall back to functorch."""
    global _REGISTERED
    if _REGISTERED:
        return
    require_opacus()
    from opacus.grad_sample.utils import register_grad_sampler

    @register_grad_sampler(RouterRow)
    def _router_row(layer: RouterRow, activations: list[torch.Tensor], backprops: torch.Tensor):
        dt = layer.weight.dtype  # x [B, ..., H], g [B, ..., 1], in the row's fp32 (or fp64)
        x, g = activations[0].to(dt), backprops.to(dt)
        out = {}
        if layer.weight.requires_grad:
            out[layer.weight] = torch.einsum("n...k,n...h->nkh", g, x)
        if layer.bias_raw.requires_grad:
            out[layer.bias_raw] = torch.einsum("n...k->nk", g)
        return out

    _REGISTERED = True


def check_trainable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module that owns trainable tensors must be one flexmoe has a checked per-sample rule for,
    and own no buffers (Opacus cannot privatise buffers). Returns those modules."""
    found = []
    for name, m in model.named_modules():
        if not any(p.requires_grad for p in m.parameters(recurse=False)):
            continue
        if type(m) not in (nn.Linear, RouterRow):
            raise FlexmoeError(
                f"Trainable module {name} ({type(m).__name__}) has no per-sample gradient rule that "
                "flexmoe has checked, so DP-SGD could clip it wrongly.",
                "DP training supports experts made of nn.Linear layers (OLMo 2 and Llama-family FFNs) "
                "and flexmoe router rows; train this anchor without --dp-epsilon.",
            )
        if list(m.buffers(recurse=False)):
            raise FlexmoeError(
                f"Trainable module {name} ({type(m).__name__}) owns buffers, which Opacus cannot privatise.",
                "train this anchor without --dp-epsilon, or freeze that module.",
            )
        found.append((name, m))
    if not found:
        raise FlexmoeError("Nothing to train: every parameter is frozen.", "this is a bug; please report it.")
    return found


@torch.no_grad()
def check_batch_axis(model: nn.Module, modules: list[tuple[str, nn.Module]], ids: torch.Tensor) -> None:
    """Run one forward pass and check that every trainable layer sees ``[batch, seq, hidden]``.

    Opacus treats dim 0 as the sample axis: a layer fed ``[batch * seq, hidden]`` (as MoE dispatch
    does) would be clipped per token, and the guarantee would silently be wrong.
    """
    seen: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(_module, args) -> None:
            seen.setdefault(name, tuple(args[0].shape))

        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in modules]
    was_training = model.training
    model.train()
    try:
        with autocast(ids.device):  # frozen weights may be bf16 on GPUs
            model(input_ids=ids, use_cache=False)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    for n, _ in modules:
        shape = seen.get(n)
        if shape is None or len(shape) != 3 or shape[0] != ids.shape[0] or shape[1] != ids.shape[1]:
            raise FlexmoeError(
                f"Trainable layer {n} sees inputs of shape {shape} for a batch of shape "
                f"{tuple(ids.shape)}: tokens are flattened or the layer is skipped, so per-sample "
                "clipping would be per token (or missing) and the DP guarantee would be wrong.",
                "train with every expert active (top-k equal to the number of experts, flexmoe's "
                "default for expert training); if you changed the model, undo that.",
            )


def per_sample_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, z_loss: float) -> torch.Tensor:
    """``[B]``: each row's mean next-token loss (padding ignored) plus its router z-loss."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    tgt = labels[:, 1:].to(logits.device)
    nll = F.cross_entropy(at_least_fp32(logits).transpose(1, 2), tgt, ignore_index=IGNORE, reduction="none")
    loss = nll.sum(1) / (tgt != IGNORE).sum(1).clamp_min(1)
    zs = [at_least_fp32(b.z_tokens).flatten(1).mean(1) for b in moe_blocks(model) if b.z_tokens is not None]
    if z_loss and zs:
        loss = loss + z_loss * torch.stack(zs).mean(0)
    return loss


def resolve_clipping(mode: str, device: torch.device, trainable: int, rows: int) -> str:
    """ "auto": per-sample gradients through hooks, unless on a GPU they would take more than a quarter
    of free memory; then ghost clipping, which never holds them but runs a second backward pass
    (measured in BENCHMARKS.md: at the small preset hooks cost 1.4x a non-DP step, ghost 2.0x, with
    the same peak memory; on CPU 1.6x and 2.5x)."""
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "hooks"
    free, _ = torch.cuda.mem_get_info(device)
    return "ghost" if rows * trainable * 4 > free // 4 else "hooks"


# --------------------------------------------------------------------------------------------------
# DP-SGD as a step strategy of the one training loop (flexmoe.training.train).


class DPStep:
    """One DP-SGD step: a Poisson batch of privacy units, per-unit clipped gradients (Opacus hooks,
    or ghost clipping), Gaussian noise, and the accountant's limit on the number of steps.

    The loop gives it the same checkpoints (with the accountant's inputs and the secret seed in
    ``state.json``), schedule, evaluation, early stopping and progress display as plain training; a
    resumed run continues the same random streams, so it equals an uninterrupted one.
    """

    record_train_loss = False  # shown to the owner, never recorded: it is not privatised
    supports_compile = False  # per-sample gradient hooks must see every layer's own forward

    def __init__(self, dp: DPSettings, plan: DPPlan, z_loss: float, eval_loss: Callable):
        self.dp, self.plan, self.z_loss, self.loss_fn = dp, plan, z_loss, eval_loss
        self.secret = dp.noise_seed if dp.noise_seed is not None else secrets.randbits(62)

    def bind(self, loop, source) -> None:
        if dist_info()[1] > 1:
            raise FlexmoeError(
                "DP training runs in one process: several processes would each need their own share of "
                "the noise and of the sampling, which flexmoe does not implement.",
                "run without torchrun (one GPU or CPU).",
            )
        if loop.cfg.fsdp or loop.cfg.activation_checkpointing:
            raise FlexmoeError(
                "DP training does not combine with FSDP or activation checkpointing (recomputed forwards "
                "would be seen twice by the per-sample gradient hooks).",
                "drop --fsdp / --activation-checkpointing.",
            )
        if not isinstance(source, Units):
            raise FlexmoeError("DP training samples privacy units.", "this is a bug; please report it.")
        modules = check_trainable_modules(loop.model)
        check_batch_axis(loop.model, modules, source.rows[:2].to(loop.device))
        register_grad_samplers()
        self.loop, self.units = loop, source
        physical = self.dp.physical_batch_size or self.plan.expected_batch_size
        n = sum(p.numel() for p in loop.params)
        self.physical, self.mode = physical, resolve_clipping(self.dp.clipping, loop.device, n, physical)

    def check_resume(self, ckpt: Path, extra: dict | None) -> None:
        saved = (extra or {}).get("dp")
        if saved is None or saved["plan"] != asdict(self.plan) or saved["config"] != _config_key(self.dp):
            raise FlexmoeError(
                f"Checkpoint {ckpt} was made without DP or with other DP settings; its privacy "
                "accounting does not carry over.",
                "resume with the original --dp-* settings, or pass --force to start over.",
            )
        self.secret = saved["secret"]

    def start(self) -> None:
        from opacus.grad_sample import GradSampleHooks, GradSampleHooksFastGradientClipping
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

        ghost = self.mode == "ghost"
        hook_kw = {"max_grad_norm": self.dp.max_grad_norm, "use_ghost_clipping": True} if ghost else {}
        hooks_cls = GradSampleHooksFastGradientClipping if ghost else GradSampleHooks
        self.hooks = hooks_cls(
            self.loop.model,
            batch_first=True,
            loss_reduction="mean",
            strict=True,
            force_functorch=self.mode == "functorch",
            **hook_kw,
        )
        self.noise_gen = torch.Generator(device=self.loop.device)
        self.dp_opt = (DPOptimizerFastGradientClipping if ghost else DPOptimizer)(
            self.loop.opt,
            noise_multiplier=self.plan.noise_multiplier,
            max_grad_norm=self.dp.max_grad_norm,
            expected_batch_size=self.plan.expected_batch_size,
            loss_reduction="mean",
            generator=self.noise_gen,
        )

    def last_step(self) -> int:
        return min(self.loop.cfg.steps, self.plan.max_steps)

    def describe(self) -> str:
        plan = self.plan
        return (
            f"DP-SGD target epsilon {plan.epsilon:g}, delta {plan.delta:.2g}, noise multiplier "
            f"{plan.noise_multiplier:.3f}, sampling rate {plan.sample_rate:.4g}, {self.last_step()} steps, "
            f"clipping {self.dp.max_grad_norm:g} per {self.dp.unit} ({self.mode})"
        )

    def gradients(self, step: int):
        sampler = torch.Generator().manual_seed(_seed(self.secret, step, 0))
        ids, labels = poisson_batch(self.units, self.plan.sample_rate, sampler)
        with _quiet_opacus():
            loss_sum = _dp_backward(self, ids, labels)
        self.noise_gen.manual_seed(_seed(self.secret, step, 1))
        return StepOut(loss_sum / max(1, len(ids)), len(ids) * self.units.rows.shape[1])

    def optimizer(self):
        return self.dp_opt

    def log_extra(self, step: int) -> str:
        return f"eps {self.plan.spent(step):.2f}"

    def extra(self, step: int) -> dict:
        plan, config = asdict(self.plan), _config_key(self.dp)
        return {"dp": {"secret": self.secret, "plan": plan, "config": config, "steps": step}}

    def close(self) -> None:
        if hasattr(self, "hooks"):
            self.hooks.cleanup()

    def finish(self, step: int, result) -> dict:
        """Check the budget and describe the mechanism for the manifest."""
        spent = self.plan.spent(step)
        if spent > self.plan.epsilon * (1 + 1e-9):
            raise FlexmoeError(
                f"Privacy accounting error: epsilon {spent:.4f} exceeds the target {self.plan.epsilon}.",
                "this is a bug in flexmoe; please report it and do not publish this expert.",
            )
        return dp_record(self.dp, self.plan, step, spent, self.mode, step >= self.last_step())


def dp_record(dp: DPSettings, plan: DPPlan, step: int, spent: float, mode: str, reached_last: bool) -> dict:
    """The manifest's privacy record: the mechanism, what was spent, and what it does not cover."""
    return {
        "mechanism": "DP-SGD: Poisson-subsampled Gaussian mechanism, per-unit clipping (Opacus)",
        "epsilon": spent,
        "target_epsilon": plan.epsilon,
        "delta": plan.delta,
        "accountant": plan.accountant,
        "noise_multiplier": plan.noise_multiplier,
        "sample_rate": plan.sample_rate,
        "expected_batch_size": plan.expected_batch_size,
        "steps": step,
        "planned_steps": plan.planned_steps,
        "stopped_at_budget": plan.max_steps < plan.planned_steps and reached_last,
        "max_grad_norm": dp.max_grad_norm,
        "unit": dp.unit,
        "private_units": plan.private_units,
        "sampled_units": plan.sampled_units,
        "clipping": mode,
        "opacus_version": require_opacus().__version__,
        "not_covered": [
            "valid_loss and history: losses on the owner's held-out (validation) data",
            "data: document count and the SHA-256 fingerprint of the training data",
            f"a secret repeated in k {dp.unit}s is protected only at about k x epsilon (group privacy)",
        ],
    }


def _config_key(dp: DPSettings) -> dict:
    """The settings a resumed run must share (the seed is stored separately, as the secret)."""
    return {k: v for k, v in asdict(dp).items() if k not in ("noise_seed", "physical_batch_size")}


def _dp_backward(step: DPStep, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """Forward and backward over one Poisson batch in chunks of ``step.physical`` rows; leaves what
    ``dp_opt.step()`` needs (per-sample gradients, or clipped sums for ghost clipping). Returns the
    summed loss, for display only."""
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    params, mode, device = step.loop.params, step.mode, step.loop.device
    if len(ids) == 0:  # an empty Poisson batch is still a step: the update is pure noise
        for p in params:
            if mode == "ghost":
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = p.new_zeros((0, *p.shape))
        return 0.0
    total = 0.0
    ghost_sum = [torch.zeros_like(p) for p in params] if mode == "ghost" else None
    for mb_ids, mb_labels in zip(ids.split(step.physical), labels.split(step.physical), strict=True):
        with autocast(device):
            loss = per_sample_loss(step.loop.model, mb_ids.to(device), mb_labels.to(device), step.z_loss)
        total += float(loss.detach().sum())
        if mode == "ghost":
            # Two backward passes: per-sample norms, then the clipped sum into p.grad (zeroed first).
            DPTensorFastGradientClipping(step.hooks, step.dp_opt, loss, "mean").backward()
            for acc, p in zip(ghost_sum, params, strict=True):
                if p.grad is not None:
                    acc += p.grad
        else:
            loss.mean().backward()  # Opacus rescales by the chunk size: per-sample grads stay exact
    if ghost_sum is not None:
        for acc, p in zip(ghost_sum, params, strict=True):
            p.grad = acc
    return total


def units_for(
    dp: DPSettings,
    train_blocks: torch.Tensor,
    own_blocks: int,
    own_docs: list[str],
    public_docs: list[str] | None,
    public_mix: float,
    tokenizer,
    seq_len: int,
) -> Units:
    """The privacy units of an expert's training set (public data, if mixed in, joins the pool)."""
    if dp.unit == "sequence":
        return sequence_units(train_blocks, own_blocks)

    own = tokenize(own_docs, tokenizer)
    docs = list(own)
    if public_docs:
        pub = tokenize(public_docs, tokenizer)
        want = max(1, round(len(own) * public_mix / (1 - public_mix)))
        docs += [pub[i % len(pub)] for i in range(want)]
    return document_units(docs, seq_len, tokenizer.pad_token_id, private=len(own))


def check_router_init(method: str) -> None:
    """Router rows initialised from the owner's documents ("embed", "hidden": their mean embedding or
    hidden state) would ship a statistic of the data outside DP-SGD; only "random" uses none."""
    if method != "random":
        raise FlexmoeError(
            f"Router init {method!r} is computed from your documents outside DP-SGD, so the package "
            "would carry a statistic of the data that the privacy guarantee does not cover.",
            "use --router-init random with --dp-epsilon (the row then learns under DP; --public-row "
            "names the public row the other experts use).",
        )


def public_row(anchor_dir: Path, method: str | None) -> torch.Tensor:
    """The published public router row to train a DP expert against. Experts compose only if they
    share it; a random owner row does not say which one the federation uses, so: ``method``, or the
    "embed" row when the anchor publishes one (the default router init of ordinary experts)."""
    pub, _ = load_published(Path(anchor_dir))
    method = method or ("embed" if "embed.public" in pub else "hidden")
    if f"{method}.public" not in pub:
        raise FlexmoeError(
            f"The anchor publishes no {method!r} public router row.",
            "use --public-row hidden (or the method the other experts were trained with).",
        )
    return pub[f"{method}.public"]
