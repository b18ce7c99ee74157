"""flexmoe's own runtime for composed models: load, choose experts, generate, attribute.

The model is the anchor's dense HF class (OLMo 2 or Llama family) with every ``layer.mlp`` replaced by
a ``FlexMoEBlock``. It reads the per-expert checkpoint that ``compose`` writes, and adds what stock
transformers cannot do: excluding experts per request (masking their router logits, which equals
physically removing them), the optional learned router biases, and per-expert routing attribution.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, TextStreamer

from flexmoe.checkpoint import TensorReader
from flexmoe.compose import BIAS_FILE, PUBLIC, load_meta
from flexmoe.errors import FlexmoeError
from flexmoe.moe import FlexMoEBlock, RouterRow, decoder_layers, moe_blocks
from flexmoe.tokenizer import load_tokenizer


@dataclass
class Composed:
    """A loaded composed model with its tokenizer, expert names and ``flexmoe.json``."""

    model: torch.nn.Module
    tokenizer: object
    names: list[str]
    meta: dict

    def set_experts(self, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None) -> None:
        """Route only over the chosen experts (the public expert stays unless excluded explicitly)."""
        set_experts(self.model, self.names, include, exclude)


def base_config(anchor_config: dict):
    """The dense config of the anchor a composed model was built from."""
    cfg = dict(anchor_config)
    model_type = cfg.pop("model_type")
    return AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items() if k not in ("architectures",)})


def from_pretrained(
    path: str | Path,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    use_bias: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Composed:
    """Load a composed model directory into flexmoe's runtime.

    ``use_bias`` applies the learned router biases that the HF format cannot hold (off by default, so
    that results equal what stock transformers and vLLM compute from the same checkpoint).
    """
    path = Path(path)
    meta = load_meta(path)
    config = base_config(meta["anchor"]["config"])
    names = [e["name"] for e in meta["experts"]]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for layer in decoder_layers(model):
        experts = [copy.deepcopy(layer.mlp) for _ in names]
        rows = [RouterRow(torch.zeros(config.hidden_size)) for _ in names]
        layer.mlp = FlexMoEBlock(experts, rows, top_k=meta["top_k"])
    model.to_empty(device=device)
    load_weights(model, TensorReader(path), load_file(str(path / BIAS_FILE)) if use_bias else None, dtype)
    model.eval()
    composed = Composed(model, load_tokenizer(path), names, meta)
    composed.set_experts(include, exclude)
    return composed


@torch.no_grad()
def load_weights(model, reader: TensorReader, biases: dict | None, dtype: torch.dtype) -> None:
    """Copy checkpoint tensors into the runtime model, translating the router layout."""
    params = dict(model.named_parameters())
    for name, t in reader.items():
        if name.endswith(".mlp.gate.weight"):
            prefix = name.removesuffix("gate.weight")
            for e in range(t.shape[0]):
                params[f"{prefix}router.{e}.weight"].copy_(t[e : e + 1].float())
        else:
            params[name].copy_(t.to(dtype))
    for name, p in params.items():
        if name.endswith("bias_raw"):
            layer_prefix, e = name.rsplit(".router.", 1)
            e = int(e.split(".")[0])
            p.fill_(float(biases[f"{layer_prefix}.bias"][e]) if biases is not None else 0.0)
    if "lm_head.weight" not in reader and getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    # Non-persistent buffers (rotary tables, masks) were left empty by to_empty(): rebuild them.
    device = model.model.embed_tokens.weight.device
    for m in model.modules():
        if isinstance(m, FlexMoEBlock):
            m.mask = torch.ones(m.num_experts, dtype=torch.bool, device=device)
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(rotary.config).to(device)


def set_experts(
    model, names: list[str], include: Sequence[str] | None, exclude: Sequence[str] | None
) -> None:
    """Mask experts out of routing. ``include`` keeps the public expert plus the named ones."""
    unknown = sorted((set(include or []) | set(exclude or [])) - set(names))
    if unknown:
        raise FlexmoeError(f"Unknown expert(s): {', '.join(unknown)}.", f"choose from {', '.join(names)}.")
    keep = set(names)
    if include:
        keep = {PUBLIC, *include}
    if exclude:
        keep -= set(exclude)
    if not keep:
        raise FlexmoeError("Every expert is excluded.", "keep at least one expert.")
    mask = torch.tensor([n in keep for n in names])
    for block in moe_blocks(model):
        block.mask = mask.to(block.mask.device)


@torch.no_grad()
def routing_shares(composed: Composed, text: str) -> dict[str, float]:
    """Share of routing weight each expert received over all tokens and layers of ``text``."""
    blocks = moe_blocks(composed.model)
    for b in blocks:
        b.record = True
    try:
        ids = composed.tokenizer(text, return_tensors="pt")["input_ids"].to(
            next(composed.model.parameters()).device
        )
        composed.model(input_ids=ids)
        totals = torch.stack([b.last_weights.reshape(-1, b.num_experts).sum(0) for b in blocks]).sum(0)
    finally:
        for b in blocks:
            b.record, b.last_weights = False, None
    totals = totals / totals.sum()
    return {n: float(v) for n, v in zip(composed.names, totals, strict=True)}


def generate(
    composed: Composed,
    prompt: str,
    max_new_tokens: int = 64,
    *,
    stream: bool = False,
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    """Generate a continuation (greedy by default); with ``stream`` print tokens as they come."""
    tok = composed.tokenizer
    enc = tok(prompt, return_tensors="pt").to(next(composed.model.parameters()).device)
    torch.manual_seed(seed)
    out = composed.model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_k=None,
        top_p=None,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if stream else None,
    )
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
