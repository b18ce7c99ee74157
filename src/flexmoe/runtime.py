"""flexmoe's own runtime for composed models: load, choose experts, generate, attribute.

The model is the anchor's dense HF class (OLMo 2 or Llama family) with every ``layer.mlp`` replaced by
a ``FlexMoEBlock``. It reads the per-expert checkpoint that ``compose`` writes, and adds what stock
transformers cannot do: excluding experts per request (masking their router logits, which equals
physically removing them), the optional learned router biases, and per-expert routing attribution.

Which experts route is a per-call ``moe.Routing`` (mask in, weights out). ``Composed.set_experts`` picks
the default for calls that bring none (``generate``, evaluation, calibration calling ``composed.model``
directly); the server passes a ``[B, E]`` mask per batch instead.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, TextStreamer

from flexmoe.chat import IM_END, has_chat_template, prompt_ids, prompt_turns, require_chat_tokens
from flexmoe.checkpoint import TensorReader
from flexmoe.compose import BIAS_FILE, PUBLIC, load_meta
from flexmoe.errors import FlexmoeError
from flexmoe.moe import FlexMoEBlock, RouterRow, Routing, active_routing, decoder_layers, moe_blocks, routing
from flexmoe.owner_tensors import OwnerTensors, load_owner_tensors, owners_at
from flexmoe.prompt_centroids import centroids
from flexmoe.sequence_routing import CALIBRATION_PROMPTS, CENTROIDS, CHAT_PROMPT_EVIDENCE, SequenceRouting
from flexmoe.signing import Trust
from flexmoe.tokenizer import load_tokenizer


@dataclass
class Composed:
    """A loaded composed model with its tokenizer, expert names and ``flexmoe.json``.

    ``mask`` (``[E]`` bool, None = every expert) is the expert choice for model calls made without a
    ``Routing`` of their own (a forward pre-hook on the decoder supplies it). With ``sequence`` set, every
    call routes per position among the experts it allows (``flexmoe.sequence_routing``).
    """

    model: torch.nn.Module
    tokenizer: object
    names: list[str]
    meta: dict
    mask: torch.Tensor | None = None
    sequence: SequenceRouting | None = None
    owner_tensors: OwnerTensors | None = None
    _hooks: list = field(default_factory=list, repr=False)

    def set_experts(self, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None) -> None:
        """Route only over the chosen experts (the public expert stays unless excluded explicitly)."""
        mask = expert_mask(self.names, include, exclude)
        self.mask = None if bool(mask.all()) else mask.to(self.device)

    def calibrate_prompts(self, conversations: Sequence[list[dict]]) -> None:
        """Sequence routing's prompt choice read on each owner's own public level
        (``SequenceRouting.calibrate_prompts``), from public chat: the prompt before the last assistant
        turn of each of the first ``CALIBRATION_PROMPTS`` conversations."""
        if self.sequence is None:
            raise FlexmoeError("Prompt calibration needs sequence routing.", "load with --sequence-routing.")
        if not has_chat_template(self.tokenizer):  # a base model's prompt is chosen by the likelihood
            raise FlexmoeError(
                "Prompt calibration is for chat models; this model has no chat template.",
                "drop --prompt-calibration.",
            )
        if not self.prompt_chosen_by_rows:  # the scale is read by the rows' prompt evidence alone
            raise FlexmoeError(
                "Prompt calibration scales the rows' prompt evidence; this model chooses a prompt's "
                f"owner by {self.sequence.prompt_kind}, which the calibration would not change.",
                "drop --prompt-calibration.",
            )
        kept = conversations[:CALIBRATION_PROMPTS]
        prompts = [prompt_ids(self.tokenizer, prompt_turns(c)) for c in kept]
        self.sequence.calibrate_prompts(self.model.get_decoder(), prompts)

    @property
    def prompt_chosen_by_rows(self) -> bool:
        """Whether a generation's prompt is given its owner by the router rows (what
        ``calibrate_prompts`` rescales); not when the owners shipped prompt centroids."""
        return self.sequence is not None and self.sequence.prompt_kind == "rows"

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    def routing(self, record: bool = False) -> Routing:
        """A ``Routing`` with this model's default expert choice."""
        return Routing(mask=self.mask, record=record)

    def install_default_routing(self) -> None:
        """Calls of ``model`` without an active ``Routing`` route with ``self.mask``; with
        ``self.sequence``, the active routing's mask is narrowed per position for the call."""
        stack: list[contextlib.ExitStack] = []

        def pre(module, args, kwargs):
            es = contextlib.ExitStack()
            r = active_routing()
            if r is None and (self.mask is not None or self.sequence is not None):
                r = es.enter_context(routing(Routing(mask=self.mask)))
            if self.sequence is not None:
                self._narrow(module, r, es, args, kwargs)
            elif self.owner_tensors is not None:  # no owner chosen alone: the merge (no stale choice)
                self.owner_tensors.owner_at = None
            stack.append(es)

        def post(_module, _args, _out):
            if stack:
                stack.pop().close()

        # On the decoder: every call goes through it, the scoring paths that skip the LM head too.
        target = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model
        self._hooks = [
            target.register_forward_pre_hook(pre, with_kwargs=True),
            target.register_forward_hook(post, always_call=True),
        ]

    def _narrow(self, module, r: Routing, es: contextlib.ExitStack, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if r.mask is None or r.mask.dim() <= 2:  # else the caller routes per token: its choice stands
            cache = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5.24 renamed it
            mask = self.sequence.mask_for_call(module, ids, kwargs.get("attention_mask"), cache, r.mask)
            if mask is not None:
                before, r.mask = r.mask, mask
                es.callback(setattr, r, "mask", before)
        if self.owner_tensors is not None:  # read by the embedding and the LM head of this call
            self.owner_tensors.owner_at = owners_at(r.mask)


def default_device() -> str:
    """The GPU when there is one (generate, route, eval, serve), else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


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
    device: str | torch.device | None = None,
    trust: Trust | None = None,
    sequence_routing: bool | SequenceRouting | None = False,
) -> Composed:
    """Load a composed model directory into flexmoe's runtime.

    Every file is verified against the maintainer's signature first: ``trust`` None requires a valid
    signature by anyone, ``Trust.from_paths(keys)`` by one of those keys, ``signing.ALLOW_UNSIGNED``
    accepts an unsigned model (a signature that does not hold is always refused).
    ``device`` defaults to the GPU when there is one. ``use_bias`` applies the learned router biases
    that the HF format cannot hold (off by default, so that results equal what stock transformers and
    vLLM compute from the same checkpoint). ``sequence_routing`` routes each position to public and at
    most one owner chosen from the text so far (``flexmoe.sequence_routing``; flexmoe's runtime only);
    None: on for a chat model whose every expert has a prompt centroid (a post-trained federation, whose
    owners' gains only sequence routing keeps; ``flexmoe.prompt_centroids``), off otherwise.
    """
    path = Path(path)
    device = default_device() if device is None else device
    meta = load_meta(path, trust)
    config = base_config(meta["anchor"]["config"])
    names = [e["name"] for e in meta["experts"]]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for layer in decoder_layers(model):
        experts = [copy.deepcopy(layer.mlp) for _ in names]
        rows = [RouterRow(torch.zeros(config.hidden_size)) for _ in names]
        layer.mlp = FlexMoEBlock(experts, rows, top_k=meta["top_k"])
    model.to_empty(device=device)
    for block in moe_blocks(model):
        block.fuse_experts_()  # before loading: the checkpoint's tensors land in the stacked storage
    load_weights(model, TensorReader(path), load_file(str(path / BIAS_FILE)) if use_bias else None, dtype)
    model.eval()
    composed = Composed(model, load_tokenizer(path), names, meta)
    chat = has_chat_template(composed.tokenizer)
    # every expert's prompt centroid (a chat federation's prompt choice), None unless all have one
    table = centroids([e["manifest"] for e in meta["experts"]], config.hidden_size) if chat else None
    if sequence_routing is None:  # on for a post-trained federation
        sequence_routing = table is not None
    if sequence_routing:  # True: the defaults; or a SequenceRouting with its own settings
        # a copy: the setting is bound to this model's head below, and a caller may load several
        composed.sequence = (
            dataclasses.replace(sequence_routing)
            if isinstance(sequence_routing, SequenceRouting)
            else SequenceRouting()
        )
        if composed.sequence.owner_tensors:
            composed.owner_tensors = load_owner_tensors(path, meta, names, model)
            if composed.owner_tensors is not None:
                composed.owner_tensors.install(model)
        composed.sequence.head = model.get_output_embeddings()
        if chat:
            _chat_prompt_choice(composed.sequence, table)
    composed.install_default_routing()
    composed.set_experts(include, exclude)
    return composed


def _chat_prompt_choice(sequence: SequenceRouting, table: torch.Tensor | None) -> None:
    """A chat model's prompt choice: by the experts' prompt centroids ``table`` when every expert has
    one (``flexmoe.prompt_centroids``), else by the rows (``CHAT_PROMPT_EVIDENCE``), unless the caller
    chose."""
    if sequence.prompt_centroids is None:
        sequence.prompt_centroids = table
    if sequence.prompt_evidence is None:
        sequence.prompt_evidence = (
            CENTROIDS if sequence.prompt_centroids is not None else CHAT_PROMPT_EVIDENCE
        )


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
    # Non-persistent buffers (rotary tables) were left empty by to_empty(): rebuild them.
    device = model.model.embed_tokens.weight.device
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(rotary.config).to(device)


def expert_mask(
    names: list[str], include: Sequence[str] | None, exclude: Sequence[str] | None
) -> torch.Tensor:
    """``[E]`` bool mask of the routable experts. ``include`` keeps the public expert plus the named ones."""
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
    return torch.tensor([n in keep for n in names])


def shares(names: list[str], totals: torch.Tensor) -> dict[str, float]:
    """Routing-weight totals ``[E]`` as shares that sum to 1."""
    totals = totals.double().cpu()
    totals = totals / totals.sum().clamp_min(1e-300)
    return {n: float(v) for n, v in zip(names, totals, strict=True)}


@torch.no_grad()
def routing_shares(composed: Composed, text: str) -> dict[str, float]:
    """Share of routing weight each expert received over all tokens and layers of ``text``."""
    ids = composed.tokenizer(text, return_tensors="pt")["input_ids"].to(composed.device)
    with routing(composed.routing(record=True)) as r:
        composed.model(input_ids=ids)
    return shares(composed.names, r.weights.reshape(-1, len(composed.names)).sum(0))


def generate(
    composed: Composed,
    prompt: str,
    max_new_tokens: int = 64,
    *,
    stream: bool = False,
    temperature: float = 0.0,
    seed: int = 0,
    static_cache: bool | None = None,
    chat: bool = False,
) -> str:
    """Generate a continuation (greedy by default); with ``stream`` print tokens as they come.
    ``chat``: ``prompt`` is one user turn in the model's chat template, the reply ends at ``<|im_end|>``.

    ``static_cache`` (default: on a GPU) decodes with a pre-allocated KV cache, which transformers
    compiles into a CUDA graph: the decode step then runs without per-layer launch overhead (12x the
    stock FlexOlmo at batch 32 in BENCHMARKS.md). On the CPU the compile costs more than it saves.
    """
    tok = composed.tokenizer
    if static_cache is None:
        # Not with sequence routing: its per-call choice lives in Python hooks, which a captured CUDA
        # graph would replay with the first call's values.
        static_cache = composed.device.type == "cuda" and composed.sequence is None
    extra = {"cache_implementation": "static"} if static_cache else {}
    eos = tok.eos_token_id
    if chat:
        require_chat_tokens(tok, "This model (--chat)")
        ids = torch.tensor([prompt_ids(tok, [{"role": "user", "content": prompt}])], device=composed.device)
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        eos = [tok.convert_tokens_to_ids(IM_END), tok.eos_token_id]
    else:
        enc = tok(prompt, return_tensors="pt").to(composed.device)
    torch.manual_seed(seed)
    out = composed.model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_k=None,
        top_p=None,
        pad_token_id=tok.pad_token_id,
        eos_token_id=eos,
        streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if stream else None,
        **extra,
    )
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
