"""The FlexOlmo block: HF semantics at zero bias, the bias parametrisation, masks, shapes."""

import copy

import pytest
import torch
from torch import nn
from transformers import FlexOlmoConfig, FlexOlmoForCausalLM, Olmo2Config, Olmo2ForCausalLM
from transformers.models.olmo2.modeling_olmo2 import Olmo2MLP

from flexmoe.moe import (
    FlexMoEBlock,
    RouterRow,
    Routing,
    anchor_state,
    anchored_expert_model,
    moe_blocks,
    nonpositive,
    routing,
)

H, I, E = 16, 24, 3


def _mlp(seed: int) -> Olmo2MLP:
    torch.manual_seed(seed)
    return Olmo2MLP(Olmo2Config(hidden_size=H, intermediate_size=I))


def _block(n: int = E, k: int = 2, seed: int = 0) -> FlexMoEBlock:
    torch.manual_seed(seed)
    return FlexMoEBlock([_mlp(seed + i) for i in range(n)], [RouterRow(torch.randn(H)) for _ in range(n)], k)


def _hf_from_olmo2(dense: Olmo2ForCausalLM, blocks: list[FlexMoEBlock], k: int) -> FlexOlmoForCausalLM:
    """A stock HF FlexOlmo model with the same shared weights, experts and router rows."""
    c = dense.config
    cfg = FlexOlmoConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        num_experts=len(blocks[0].experts),
        num_experts_per_tok=k,
        norm_topk_prob=False,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_parameters["rope_theta"],
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    hf = FlexOlmoForCausalLM(cfg).eval()
    sd = {k_: v for k_, v in dense.state_dict().items() if ".mlp." not in k_}
    for i, b in enumerate(blocks):
        sd[f"model.layers.{i}.mlp.gate.weight"] = torch.cat([r.weight for r in b.router])
        sd[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in b.experts]
        )
        sd[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([e.down_proj.weight for e in b.experts])
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    return hf


@pytest.mark.parametrize("k", [1, 2, 3])
def test_equals_hf_flex_olmo_at_zero_bias(k):
    torch.manual_seed(0)
    dense = Olmo2ForCausalLM(
        Olmo2Config(
            vocab_size=64,
            hidden_size=H,
            intermediate_size=I,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    ).eval()
    blocks = [_block(E, k, seed=10 * i) for i in range(2)]
    hf = _hf_from_olmo2(dense, blocks, k)
    for layer, b in zip(dense.model.layers, blocks, strict=True):
        layer.mlp = b
    x = torch.randint(0, 64, (2, 12))
    torch.testing.assert_close(dense(x).logits, hf(x).logits, atol=1e-5, rtol=1e-5)


def test_bias_never_positive_and_gradient_never_dies():
    row = RouterRow(torch.zeros(H), bias=0.0)
    opt = torch.optim.SGD(row.parameters(), lr=0.5)
    x = torch.ones(1, H)
    for _ in range(3):  # a loss that wants a larger bias: projected back onto b <= 0
        (-row(x).sum()).backward()
        opt.step()
        opt.zero_grad()
        row.project_()
        assert float(row.bias.detach()) <= 0.0
    assert float(row.bias.detach()) == 0.0
    (row(x).sum()).backward()  # at b = 0 (where Ai2's min(b, 0) has dead zone) the gradient is alive
    assert row.bias_raw.grad.item() == pytest.approx(1.0)
    opt.step()
    assert float(row.bias) < 0.0
    # Ai2's parametrisation, for contrast: zero gradient once the raw value is positive.
    raw = torch.tensor([0.3], requires_grad=True)
    torch.clamp(raw, max=0.0).sum().backward()
    assert raw.grad.item() == 0.0
    raw2 = torch.tensor([0.3], requires_grad=True)
    nonpositive(raw2).sum().backward()
    assert raw2.grad.item() == 1.0 and float(nonpositive(raw2)) == 0.0


def test_bias_init_is_explicit_and_clamped():
    assert float(RouterRow(torch.zeros(H), bias=-0.7).bias) == pytest.approx(-0.7)
    assert float(RouterRow(torch.zeros(H), bias=2.0).bias) == 0.0


def test_mask_equals_physical_removal():
    full = _block(4, 2).eval()
    reduced = FlexMoEBlock(
        [full.experts[i] for i in (0, 1, 3)], [full.router[i] for i in (0, 1, 3)], top_k=2
    ).eval()
    x = torch.randn(3, 7, H)
    expected = reduced(x)
    with routing(Routing(mask=torch.tensor([True, True, False, True]))):
        masked = full(x)
    torch.testing.assert_close(masked, expected, atol=1e-6, rtol=1e-6)
    full.fuse_experts_()  # the grouped (inference) path masks the same way
    with routing(Routing(mask=torch.tensor([True, True, False, True]))):
        torch.testing.assert_close(full(x), expected, atol=1e-6, rtol=1e-6)


def test_per_sequence_and_per_token_masks_in_one_batch():
    """Each row of a batch routes with its own expert set and equals that row computed alone."""
    b = _block(4, 2).eval()
    b.fuse_experts_()
    x = torch.randn(3, 5, H)
    rows = torch.tensor([[True, True, True, True], [True, False, True, True], [True, True, True, False]])
    with routing(Routing(mask=rows, record=True)) as r:
        y = b(x)
    for i in range(3):
        with routing(Routing(mask=rows[i])):
            torch.testing.assert_close(y[i : i + 1], b(x[i : i + 1]), atol=1e-6, rtol=1e-6)
    assert (r.weights[1, :, 1] == 0).all() and (r.weights[2, :, 3] == 0).all()
    assert (r.weights[0] > 0).sum() == 2 * 5  # recorded: top-2 per token
    per_token = rows[:, None, :].expand(3, 5, 4).clone()
    with routing(Routing(mask=per_token)):
        torch.testing.assert_close(b(x), y)


def test_no_routing_state_left_on_the_block():
    b = _block(4, 2).eval()
    with routing() as r:
        b(torch.randn(1, 3, H))
    assert r.weights.shape == (1, 3, 4)
    assert not any(isinstance(v, torch.Tensor) and v.dtype == torch.bool for v in vars(b).values())
    assert "mask" not in dict(b.named_buffers())


def test_grouped_and_dense_paths_agree():
    b = _block(4, 2).eval()
    x = torch.randn(2, 9, H)
    w = b.routing_weights(b.router_logits(x))
    assert ((w > 0).sum(-1) == 2).all()  # exactly top-2 non-zero, not renormalised
    assert (w.sum(-1) <= 1 + 1e-6).all() and (w.sum(-1) < 0.99).any()  # dropped mass stays dropped
    dense = b._dense(x, w)
    b.fuse_experts_()
    assert b.experts[1].gate_proj.weight.data_ptr() == b.fused[0][1].data_ptr()  # views, no copy
    torch.testing.assert_close(b._grouped(x, w), dense, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b(x), dense, atol=1e-6, rtol=1e-6)


def test_sparse_training_path_equals_dense_in_value_and_gradient():
    """The CPU's per-expert dispatch (unfused, top-k < E, training): same output and same gradients for
    experts and router rows as running every expert densely, with one expert masked out and another
    chosen by no token."""
    x = torch.randn(3, 7, H)
    mask = torch.tensor([True, True, False, True, True])
    grads = {}
    for path in ("_dense", "_sparse"):
        b = _block(5, 2).train()
        with torch.no_grad():  # expert 4 is chosen by no token
            b.router[4].bias_raw.fill_(-1e4)
        xi = x.clone().requires_grad_(True)
        with routing(Routing(mask=mask)):
            w = b.routing_weights(b.router_logits(xi, mask))
            assert (w[..., 2] == 0).all() and (w[..., 4] == 0).all() and (w[..., 3] > 0).any()
            y = getattr(b, path)(xi, w)
            if path == "_sparse":
                torch.testing.assert_close(b(xi), y)  # what forward chooses on the CPU in training
        (y * torch.linspace(-1, 1, H)).sum().backward()
        grads[path] = (y.detach(), xi.grad, [p.grad for p in b.parameters()])
    (yd, xd, pd), (ys, xs, ps) = grads["_dense"], grads["_sparse"]
    torch.testing.assert_close(ys, yd, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(xs, xd, atol=1e-6, rtol=1e-5)
    assert len(pd) == len(ps)
    for gd, gs in zip(pd, ps, strict=True):
        if gd is None or not gd.any():  # unchosen experts: no gradient at all on the sparse path
            assert gs is None or not gs.any()
        else:
            torch.testing.assert_close(gs, gd, atol=1e-6, rtol=1e-5)


def test_fused_router_equals_the_rows():
    """Inference stacks the router rows into one matrix; logits (biases included) stay the same and
    the rows stay views of it (an in-place edit such as calibration reaches both)."""
    b = _block(4, 2).eval()
    for i, row in enumerate(b.router):
        row.bias_raw.data.fill_(-0.1 * i)
    x = torch.randn(2, 5, H)
    before = b.router_logits(x)
    b.fuse_experts_()
    torch.testing.assert_close(b.router_logits(x), before)
    b.router[0].weight.data.mul_(2.0)
    assert torch.equal(b.fused_router[0], b.router[0].weight[0])


def test_anchored_model_starts_as_the_anchor_and_freezes_it():
    torch.manual_seed(0)
    cfg = Olmo2Config(
        vocab_size=64,
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    anchor = Olmo2ForCausalLM(cfg).eval()
    before = copy.deepcopy(anchor.state_dict())
    x = torch.randint(0, 64, (2, 10))
    ref = anchor(x).logits
    rows = torch.randn(2, H)
    model = anchored_expert_model(anchor, rows, torch.randn(2, H), bias_init=-0.5)
    torch.testing.assert_close(model(x).logits, ref, atol=1e-5, rtol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp.experts.1." in n or ".mlp.router.1." in n for n in trainable)
    assert anchor_state(model).keys() == before.keys()
    assert all(torch.equal(anchor_state(model)[k], v) for k, v in before.items())


def test_trainable_layers_see_batch_seq_hidden():
    torch.manual_seed(0)
    cfg = Olmo2Config(
        vocab_size=64,
        hidden_size=H,
        intermediate_size=I,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = anchored_expert_model(Olmo2ForCausalLM(cfg), torch.randn(1, H), torch.randn(1, H))
    shapes = []
    for m in model.modules():
        if isinstance(m, (nn.Linear, RouterRow)) and any(p.requires_grad for p in m.parameters()):
            m.register_forward_hook(lambda mod, a, o: shapes.append(tuple(a[0].shape)))
    model(torch.randint(0, 64, (3, 5)))
    assert shapes and all(len(s) == 3 and s[:2] == (3, 5) for s in shapes)


def test_z_loss_only_in_training():
    b = _block()
    b.train()
    b(torch.randn(1, 4, H))
    assert b.z_loss is not None and b.z_loss > 0
    b.eval()
    b(torch.randn(1, 4, H))
    assert b.z_loss is None
    assert moe_blocks(nn.Sequential(b)) == [b]


def test_expert_model_lives_on_the_anchors_device():
    """Every tensor the wrapper adds (router rows, bias, routing mask) sits where the anchor is: a
    buffer left on the CPU under a GPU anchor breaks DDP's broadcast (checked on the meta device)."""
    cfg = Olmo2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    with torch.device("meta"):
        model = Olmo2ForCausalLM(cfg)
        rows = torch.zeros(2, 16)
    anchored_expert_model(model, rows, rows.clone())
    where = {t.device.type for t in [*model.parameters(), *model.buffers()]}
    assert where == {"meta"}


def test_forward_has_no_graph_breaks():
    """No host synchronisation in the forward: dynamo traces training (top-2 of 2) and masked grouped
    inference (bf16, per-sequence masks, recording) as single graphs."""
    train = _block(2, 2).train()
    x = torch.randn(2, 5, H)
    torch._dynamo.reset()
    assert torch._dynamo.explain(train)(x).graph_break_count == 0
    infer = _block(4, 2).eval()
    infer.experts.to(torch.bfloat16)
    infer.fuse_experts_()
    torch._dynamo.reset()
    with routing(Routing(mask=torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1]], dtype=torch.bool), record=True)):
        e = torch._dynamo.explain(infer)(x.bfloat16())
    assert e.graph_break_count == 0 and e.graph_count == 1
