"""Prompt centroids: which owner a chat prompt belongs to, by the nearest mean of anchor features.

Why: a generation under sequence routing keeps one choice of owner for the prompt and everything it
generates. The owners' router rows were trained to tell their owner's tokens from public ones, never
one owner's text from another's, and as a classifier of whole prompts they are unreliable: on the
`small` post-training demo the rows (calibrated or not) sent 113 to 155 of 200 math prompts to another
owner, from one training run to the next (BENCHMARKS.md, "Prompt centroids"). Which domain a prompt
comes from is a much easier question for the features of a language model: the mean, over a prompt's
positions and over the layers, of the anchor's FFN inputs. Each class (public and every owner) is one
mean of such features, and a prompt goes to the nearest (Euclidean; chosen on validation prompts).

Who computes what:

- an owner, after its ``sft`` stage, on its own chat prompts (``MAX_PROMPTS`` at most), in the anchor it
  trained against: a public model, so the runtime computes the same feature for any prompt. The mean
  ships in the package manifest (``prompt_centroid``, hashed and signed with it);
- the maintainer, after ``anchor train --stage sft``, on public chat prompts, in ``flexmoe_anchor.json``;
  compose copies it into the public expert's entry of ``flexmoe.json``;
- flexmoe's runtime (``SequenceRouting.prompt_centroids``): the prompt's feature in the public-alone pass,
  which computes with the anchor's tensors, then the nearest centroid among public and the allowed
  owners. Removing an owner removes its manifest and with it its centroid: opt-out stays exact.

What an owner discloses: one vector of ``hidden_size`` numbers, the mean of at least ``MIN_PROMPTS``
prompts' features (no prompt, no per-prompt statistic), the same kind of number as the class means of
``flexmoe expert stats``. An owner with fewer prompts ships none, and a model where any owner has none
chooses by the rows as before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from flexmoe.anchor import load_anchor
from flexmoe.chat import chat_splits, has_chat_template, prompt_ids, prompt_turns
from flexmoe.errors import FlexmoeError
from flexmoe.formats import read_anchor_meta, write_anchor_meta
from flexmoe.parallel import decoder_layers
from flexmoe.router_init import RouterInputs
from flexmoe.tokenizer import load_tokenizer

FIELD = "prompt_centroid"  # the manifest / anchor-meta entry
FEATURE = "anchor FFN inputs, mean over the prompt's positions, then over layers"
MIN_PROMPTS = 20  # no centroid is published from fewer prompts than this
MAX_PROMPTS = 400


def pooled(per_layer: Sequence[torch.Tensor], attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, H]``: each layer's ``[B, S, H]`` FFN input averaged over the valid positions, then the layers."""
    B, S = per_layer[0].shape[:2]
    valid = torch.ones(B, S, device=per_layer[0].device) if attention_mask is None else attention_mask
    w = valid.double()[..., None] / valid.double().sum(1).clamp_min(1)[:, None, None]
    return torch.stack([(h.double() * w).sum(1) for h in per_layer]).mean(0)


@torch.no_grad()
def anchor_features(model, tokenizer, conversations: Sequence[list[dict]]) -> torch.Tensor:
    """``[N, H]`` (float64) the feature of each conversation's prompt (the turns before its last reply)
    in a dense anchor ``model``: what the runtime's public-alone pass computes for the same prompt."""
    cap = RouterInputs([layer.mlp for layer in decoder_layers(model)])
    device = next(model.parameters()).device
    out = []
    try:
        model.eval()
        for c in conversations:
            ids = torch.tensor([prompt_ids(tokenizer, prompt_turns(c))], device=device)
            model(input_ids=ids, use_cache=False)
            out.append(pooled(cap.seen, None)[0].cpu())
    finally:
        cap.close()
    return torch.stack(out)


def centroid_record(model, tokenizer, conversations: Sequence[list[dict]]) -> dict | None:
    """The ``prompt_centroid`` entry of a manifest: the mean feature of up to ``MAX_PROMPTS`` prompts;
    None (nothing published) with fewer than ``MIN_PROMPTS``."""
    kept = list(conversations)[:MAX_PROMPTS]
    if len(kept) < MIN_PROMPTS:
        return None
    mean = anchor_features(model, tokenizer, kept).mean(0)
    return {"mean": [float(x) for x in mean.float()], "prompts": len(kept), "feature": FEATURE}


def measure(anchor_dir, tokenizer, chat, fix: str) -> dict:
    """The centroid of the training conversations of ``chat`` (a directory with ``train.jsonl`` or a
    file) in the anchor at ``anchor_dir`` (on the GPU when there is one); too few is an error whose
    fix is ``fix``. What ``anchor centroid`` and ``expert centroid`` publish."""
    convs = chat_splits(chat)[0]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = centroid_record(load_anchor(anchor_dir, torch.float32).to(device), tokenizer, convs)
    if record is None:
        raise FlexmoeError(
            f"{chat} has {len(convs)} training conversations; a prompt centroid needs {MIN_PROMPTS}.", fix
        )
    return record


def published(anchor_dir) -> dict | None:
    """The public centroid an anchor was published with (``flexmoe_anchor.json``), if any."""
    return (read_anchor_meta(Path(anchor_dir)) or {}).get(FIELD)


def publish(anchor_dir, chat) -> dict:
    """Maintainer: write the public centroid into a chat anchor's ``flexmoe_anchor.json`` (what
    ``anchor train --stage sft`` does; for anchors post-trained before it did) from public chat
    conversations (``chat``: a directory with ``train.jsonl`` or a file). Returns the entry."""
    anchor_dir = Path(anchor_dir)
    meta = read_anchor_meta(anchor_dir)
    tok = load_tokenizer(anchor_dir)
    if meta is None or not has_chat_template(tok):
        raise FlexmoeError(
            f"{anchor_dir} is no chat anchor made by flexmoe (flexmoe_anchor.json and a chat template).",
            "pass the anchor written by flexmoe anchor train --stage sft.",
        )
    record = measure(anchor_dir, tok, chat, "pass the public chat training set.")
    write_anchor_meta(anchor_dir, {**meta, FIELD: record})
    return record


def check_record(record, hidden_size: int, where: str) -> None:
    """Refuse a malformed centroid (wrong length, non-finite, too few prompts) naming ``where``."""
    try:
        mean, n = record["mean"], int(record["prompts"])
        ok = len(mean) == hidden_size and n >= MIN_PROMPTS and all(math.isfinite(float(x)) for x in mean)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise FlexmoeError(
            f"{where}: its {FIELD} is malformed (needs {hidden_size} finite numbers from at least "
            f"{MIN_PROMPTS} prompts).",
            "ask its owner to re-send the package (flexmoe expert train --stage sft writes it).",
        )


def centroids(manifests: Sequence[dict], hidden_size: int) -> torch.Tensor | None:
    """``[E, H]`` every expert's centroid (public first) from the manifests of a composed model; None
    unless every expert has one."""
    records = [m.get(FIELD) for m in manifests]
    if any(r is None for r in records):
        return None
    for m, r in zip(manifests, records, strict=True):
        check_record(r, hidden_size, f"expert {m.get('name')!r}")
    return torch.tensor([r["mean"] for r in records], dtype=torch.float64)


def nearest(features: torch.Tensor, table: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, E]`` bool: the allowed class (public or an owner) whose centroid is nearest each feature
    ``[B, H]``, plus public when allowed (``allowed``: ``[E]`` or ``[B, E]``)."""
    B, E = features.shape[0], table.shape[0]
    ok = torch.ones(B, E, dtype=torch.bool) if allowed is None else allowed.bool().cpu().expand(B, E)
    d = torch.cdist(features.double().cpu(), table.double()).masked_fill(~ok, float("inf"))
    out = torch.zeros(B, E, dtype=torch.bool)
    out[torch.arange(B), d.argmin(-1)] = True
    out[:, 0] |= ok[:, 0]
    return out
