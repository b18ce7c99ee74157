"""The auxiliary "mine vs public" routing loss an owner may add to expert training.

FlexOlmo's owner trains its router row only through the language-model loss: the row learns where
its expert lowers the loss, which on text the anchor never saw is "anything unusual". With public
documents mixed into training (router negatives), this loss also tells the row directly what is not
its own: binary cross-entropy of the routing margin ``r_own.h + b_own - r_pub.h`` per token and layer,
target 1 on the owner's sequences and 0 on public ones. Ai2's unreleased CE-constrained router used
weight 0.1 (centrally); here each owner applies it alone, against public text only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexmoe.moe import moe_blocks


class MineVsPublic:
    """Captures each MoE block's router input and scores the 2-expert routing decision."""

    def __init__(self, model, public_blocks: torch.Tensor):
        self.blocks = moe_blocks(model)
        # The trainer passes batches of blocks, not labels: public blocks are recognised by content.
        self.public = {bytes(b.numpy().tobytes()) for b in public_blocks.cpu()}
        self.inputs: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.hooks = [
            b.register_forward_pre_hook(lambda m, a, i=i: self.inputs.__setitem__(i, a[0]))
            for i, b in enumerate(self.blocks)
        ]

    def labels(self, batch: torch.Tensor) -> torch.Tensor:
        """1 for the owner's sequences, 0 for public ones."""
        return torch.tensor(
            [0.0 if bytes(r.numpy().tobytes()) in self.public else 1.0 for r in batch.cpu()],
            device=batch.device,
        )

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean BCE of the margin over tokens and layers of the last forward (call after it)."""
        y = self.labels(batch)
        losses = []
        for block, x in zip(self.blocks, self.inputs, strict=True):
            margin = (block.router[1](x) - block.router[0](x)).squeeze(-1)  # [B, T]
            losses.append(F.binary_cross_entropy_with_logits(margin, y[:, None].expand_as(margin)))
        return torch.stack(losses).mean()

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
