"""Sharded training with PyTorch's own FSDP2 (``fully_shard``), composed onto an unchanged model.

The training loop (``flexmoe.training.train``) stays the same code for one process, several CPU
processes (gloo) and many GPUs (NCCL); with ``TrainConfig.fsdp`` it calls ``shard`` here instead of
wrapping the model in DDP. Sharding units follow torchtitan: one per decoder layer plus the root
(embeddings, final norm, LM head). Inside a FlexOlmo block, the trainable owner experts and every
router row get units of their own because FSDP2 needs one dtype per unit: on a GPU the frozen anchor
stays in its checkpoint dtype (bf16) while trainable weights keep fp32 master copies, and router rows
compute in fp32 as Hugging Face ``flex_olmo`` does.

Parameters become ``DTensor`` shards; ``full`` / ``load_full_`` convert to and from whole tensors for
checkpoints and packages (collectives: every rank must call them).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of an HF causal LM (OLMo 2 and the Llama family share ``model.model.layers``)."""
    return model.model.layers


def ensure_process_group() -> None:
    """FSDP2 needs a process group even on one process: make a single-rank one when not under torchrun."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def activation_checkpointing_(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass.

    Each layer is wrapped (non-reentrant ``checkpoint_wrapper``, as torchtitan does) before FSDP2 is
    applied, so that FSDP's all-gather hooks sit outside the recomputed region. HF's own
    ``gradient_checkpointing_enable`` puts them inside, which breaks recomputation under bf16 FSDP2.
    Parameter names gain ``_checkpoint_wrapped_module.``; state dicts strip it again.
    """
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def shard(model: nn.Module, groups: list[dict], bf16: bool) -> list[dict]:
    """Apply FSDP2 to ``model`` in place; return ``groups`` rebuilt over the sharded parameters.

    ``bf16`` all-gathers weights in bf16 for compute and reduces gradients in fp32.
    """
    ensure_process_group()
    names = {id(p): n for n, p in model.named_parameters()}
    named_groups = [{**g, "params": [names[id(p)] for p in g["params"]]} for g in groups]
    low = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    exact = MixedPrecisionPolicy()  # router logits stay fp32
    policy = {"mp_policy": low} if low else {}
    for layer in decoder_layers(model):
        if hasattr(layer.mlp, "router") and hasattr(layer.mlp, "experts"):  # a flexmoe.moe.FlexMoEBlock
            for row in layer.mlp.router:
                fully_shard(row, mp_policy=exact)
            for expert in layer.mlp.experts[1:]:
                fully_shard(expert, **policy)
        fully_shard(layer, **policy)
    fully_shard(model, **policy)
    params = dict(model.named_parameters())
    return [{**g, "params": [params[n] for n in g["params"]]} for g in named_groups]


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Skip the gradient reduce-scatter on all but the last micro-batch of an accumulation."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a (possibly sharded) tensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def load_full_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy a whole tensor into ``dst``, which may be a shard."""
    if isinstance(dst, DTensor):
        src = distribute_tensor(src.to(dst.device, dst.dtype), dst.device_mesh, dst.placements)
    dst.copy_(src)


def as_like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) laid out like ``param``: sharded when ``param`` is."""
    if isinstance(param, DTensor) and not isinstance(value, DTensor) and value.shape == param.shape:
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value.to(param.device) if value.dim() else value
