"""FlexOlmo routing on Llama-family decoders, for ``trust_remote_code=True`` loading.

Copied next to every composed Llama/Mistral/Qwen2 checkpoint by flexmoe. Self-contained: it needs only
torch and transformers. Why not Mixtral's format: Mixtral (and Qwen-MoE) renormalise the top-k
routing weights, while FlexOlmo keeps the softmax over all experts un-renormalised; converting would
change every output. Tensor layout is the same per-expert layout as HF ``flex_olmo``::

    model.layers.{L}.mlp.gate.weight                   [E, H]
    model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.weight
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.mistral.modeling_mistral import MistralMLP
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP


class FlexMoESparseBlock(nn.Module):
    """Softmax over all experts in fp32, top-k, weights not renormalised (FlexOlmo semantics)."""

    def __init__(self, config, mlp_cls):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList([mlp_cls(config) for _ in range(config.num_experts)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        top_v, top_i = probs.topk(self.top_k, dim=-1)
        top_v = top_v.to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = (top_i == e).nonzero(as_tuple=True)
            if tok.numel():
                out.index_add_(0, tok, expert(x[tok]) * top_v[tok, slot, None])
        return out.view(shape)


def _config_class(base, name):
    class Config(base):
        model_type = f"flexmoe_{name}"

        def __init__(self, num_experts=2, num_experts_per_tok=2, norm_topk_prob=False, **kwargs):
            self.num_experts = num_experts
            self.num_experts_per_tok = num_experts_per_tok
            self.norm_topk_prob = norm_topk_prob
            super().__init__(**kwargs)

    Config.__name__ = Config.__qualname__ = f"FlexMoE{name.capitalize()}Config"
    return Config


def _model_class(base, config_cls, mlp_cls, name):
    class Model(base):
        config_class = config_cls

        def __init__(self, config):
            super().__init__(config)
            for layer in self.model.layers:
                layer.mlp = FlexMoESparseBlock(config, mlp_cls)
            self.post_init()

    Model.__name__ = Model.__qualname__ = f"FlexMoE{name.capitalize()}ForCausalLM"
    return Model


FlexMoELlamaConfig = _config_class(LlamaConfig, "llama")
FlexMoEMistralConfig = _config_class(MistralConfig, "mistral")
FlexMoEQwen2Config = _config_class(Qwen2Config, "qwen2")
FlexMoELlamaForCausalLM = _model_class(LlamaForCausalLM, FlexMoELlamaConfig, LlamaMLP, "llama")
FlexMoEMistralForCausalLM = _model_class(MistralForCausalLM, FlexMoEMistralConfig, MistralMLP, "mistral")
FlexMoEQwen2ForCausalLM = _model_class(Qwen2ForCausalLM, FlexMoEQwen2Config, Qwen2MLP, "qwen2")
