"""Differential privacy: accounting against Opacus, exact per-sample gradients, the budget, the manifest,
resume, bad input."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import make_anchor_dir
from safetensors.torch import load_file
from typer.testing import CliRunner

from flexmoe.cli import app
from flexmoe.compose import FLEXMOE_JSON, UNSIGNED_OK, compose
from flexmoe.data import read_documents
from flexmoe.errors import FlexmoeError
from flexmoe.expert import privacy as P
from flexmoe.expert.package import TENSOR_FILE
from flexmoe.expert.train import ExpertSpec, train_expert

pytest.importorskip("opacus")

KW = dict(seq_len=64, batch_size=4, quiet=True, spec=ExpertSpec(name="lg", router_init="random"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second intra-op thread only adds synchronisation, which costs ten
    times the work itself when the two cores are shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def anchor(demo_data, tmp_path_factory):
    docs = read_documents([demo_data / "public" / "train.jsonl"])[:80]
    return make_anchor_dir(tmp_path_factory.mktemp("dp") / "anchor", "olmo2", docs)


@pytest.fixture(scope="module")
def dp_expert(anchor, demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("dp") / "expert"
    m = train_expert(
        anchor,
        [demo_data / "legal"],
        "lg",
        out,
        steps=4,
        public=[demo_data / "public"],
        dp=P.DPConfig(epsilon=8.0),
        **KW,
    )
    return out, m


def _expert_model(anchor, seed=0):
    """The 2-expert training model, with the owner expert moved off the anchor so routing matters."""
    from flexmoe.anchor import load_anchor
    from flexmoe.moe import anchored_expert_model

    model = load_anchor(anchor, torch.float32)
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    anchored_expert_model(
        model, 0.3 * torch.randn(L, H, generator=g), 0.3 * torch.randn(L, H, generator=g), -0.2
    )
    with torch.no_grad():
        for layer in model.model.layers:
            for p in layer.mlp.experts[1].parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.train()


# --------------------------------------------------------------------------------------------------
# Accounting


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_noise_and_epsilon_agree_with_opacus(accountant):
    from opacus import PrivacyEngine
    from opacus.accountants import create_accountant

    n, batch, epochs, eps, delta = 1000, 50, 4, 3.0, 1e-5
    plan = P.make_plan(
        P.DPConfig(epsilon=eps, delta=delta, accountant=accountant),
        private_units=n,
        sampled_units=n,
        batch_size=batch,
        steps=epochs * n // batch,
    )
    # Opacus' own path: make_private_with_epsilon on a data loader of the same size and batch.
    module = torch.nn.Linear(2, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(n, 2)), batch_size=batch)
    engine = PrivacyEngine(accountant=accountant)
    _, opt, _ = engine.make_private_with_epsilon(
        module=module,
        optimizer=torch.optim.SGD(module.parameters(), lr=0.1),
        data_loader=loader,
        target_epsilon=eps,
        target_delta=delta,
        epochs=epochs,
        max_grad_norm=1.0,
    )
    assert plan.sample_rate == pytest.approx(batch / n)
    # Same target, same accountant: sigma within the two bisections' tolerances (flexmoe's RDP also
    # searches larger orders, which can only lower sigma).
    assert plan.noise_multiplier == pytest.approx(opt.noise_multiplier, rel=0.03)
    # Opacus' accountant stepped one step at a time gives the epsilon flexmoe reports, within target.
    acc = create_accountant(accountant)
    for _ in range(plan.planned_steps):
        acc.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    stepped = acc.get_epsilon(delta, **P.accountant_kwargs(accountant))
    assert plan.spent(plan.planned_steps) == pytest.approx(stepped, rel=1e-9)
    assert eps * 0.95 <= stepped <= eps


def test_fixed_noise_stops_at_the_budget():
    plan = P.make_plan(
        P.DPConfig(epsilon=2.0, noise_multiplier=1.0),
        private_units=500,
        sampled_units=500,
        batch_size=25,
        steps=400,
    )
    assert 0 < plan.max_steps < 400
    assert plan.spent(plan.max_steps) <= 2.0 < plan.spent(plan.max_steps + 1)


# --------------------------------------------------------------------------------------------------
# Per-sample gradients


def test_per_sample_gradients_are_exact_and_sum_to_the_batch_gradient(anchor):
    from opacus.grad_sample import GradSampleHooks, GradSampleHooksFastGradientClipping

    P.register_grad_samplers()
    model = _expert_model(anchor)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert {type(m).__name__ for _, m in P.check_trainable_modules(model)} == {"Linear", "RouterRow"}
    ids = torch.randint(3, 300, (3, 12), generator=torch.Generator().manual_seed(1))
    samples = {}
    for mode in ("hooks", "functorch"):
        model.zero_grad()
        hooks = GradSampleHooks(model, loss_reduction="mean", force_functorch=mode == "functorch")
        P.per_sample_loss(model, ids, ids, z_loss=0.1).mean().backward()
        samples[mode] = {n: p.grad_sample.clone() for n, p in params}
        for n, p in params:  # the mean of per-sample gradients is the ordinary batch gradient
            torch.testing.assert_close(samples[mode][n].mean(0), p.grad, atol=1e-6, rtol=1e-4)
        hooks.cleanup()
    for i in range(len(ids)):  # and each one is that sequence's own gradient
        model.zero_grad()
        P.per_sample_loss(model, ids[i : i + 1], ids[i : i + 1], z_loss=0.1).sum().backward()
        for n, p in params:
            torch.testing.assert_close(samples["hooks"][n][i], p.grad, atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(samples["functorch"][n][i], p.grad, atol=1e-6, rtol=1e-4)
    # Ghost clipping's per-sample norms equal the norms of the instantiated per-sample gradients.
    model.zero_grad()
    ghost = GradSampleHooksFastGradientClipping(model, loss_reduction="mean", max_grad_norm=1.0)
    P.per_sample_loss(model, ids, ids, z_loss=0.1).mean().backward()
    norms = torch.stack([samples["hooks"][n].flatten(1).norm(dim=1) for n, _ in params], 1).norm(dim=1)
    torch.testing.assert_close(ghost.get_norm_sample(), norms, atol=1e-5, rtol=1e-4)
    ghost.cleanup()


def test_flattened_tokens_and_unsupported_modules_are_refused(anchor):
    from flexmoe.moe import moe_blocks

    model = _expert_model(anchor)
    modules = P.check_trainable_modules(model)
    ids = torch.randint(3, 300, (2, 8))
    P.check_batch_axis(model, modules, ids)  # top-2 of 2: every layer sees [batch, seq, hidden]

    def token_dispatch(block):
        dense = block._dense

        def run(x, weights):  # a dispatching MoE feeds its experts [tokens, hidden]
            flat = dense(x.reshape(-1, x.shape[-1]), weights.reshape(-1, weights.shape[-1]))
            return flat.reshape(x.shape)

        return run

    # (top-k < E no longer flattens: unfused blocks run densely, so the dispatch is provoked directly)
    for b in moe_blocks(model):
        b._dense = token_dispatch(b)
    with pytest.raises(FlexmoeError, match="per token"):
        P.check_batch_axis(model, modules, ids)
    model.model.norm.weight.requires_grad_(True)  # an RMSNorm: no checked per-sample rule
    with pytest.raises(FlexmoeError, match="no per-sample gradient rule"):
        P.check_trainable_modules(model)


def test_empty_poisson_batch_is_a_noise_only_step(anchor):
    from opacus.grad_sample import GradSampleHooks
    from opacus.optimizers import DPOptimizer

    P.register_grad_samplers()
    model = _expert_model(anchor)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    hooks = GradSampleHooks(model, loss_reduction="mean")
    opt = DPOptimizer(
        torch.optim.SGD(params, lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4
    )
    empty = torch.zeros((0, 8), dtype=torch.long)
    loop = SimpleNamespace(params=params, device=torch.device("cpu"), model=model)
    step = SimpleNamespace(loop=loop, mode="hooks", physical=4, z_loss=0.0, hooks=hooks, dp_opt=opt)
    assert P._dp_backward(step, empty, empty) == 0.0
    opt.step()
    hooks.cleanup()
    moved = [(p - b).abs().max().item() for p, b in zip(params, before, strict=True)]
    assert all(m > 0 for m in moved)  # noise only: std 1.0 * 1.0 / 4 per coordinate


def test_units_and_poisson_sampling():
    u = P.document_units([[1, 2, 3, 4, 5], [6, 7], [8]], seq_len=3, pad_id=0, private=2)
    assert len(u) == 2 and u.private == 2  # the one-token document cannot be trained on
    assert u.offsets.tolist() == [0, 2, 3]
    assert u.rows.tolist() == [[1, 2, 3], [4, 5, 0], [6, 7, 0]]
    assert u.labels.tolist() == [[1, 2, 3], [4, 5, P.IGNORE], [6, 7, P.IGNORE]]
    ids, _ = P.poisson_batch(u, 1.0, torch.Generator().manual_seed(0))
    assert len(ids) == 2 and ids[1].tolist() == [6, 7, 0]  # one row per joining unit
    assert len(P.poisson_batch(u, 0.0, torch.Generator())[0]) == 0
    s = P.sequence_units(torch.arange(4000).view(1000, 4), private=800)
    sizes = [len(P.poisson_batch(s, 0.05, torch.Generator().manual_seed(i))[0]) for i in range(200)]
    assert abs(sum(sizes) / len(sizes) - 50) < 2 and len(set(sizes)) > 5  # Binomial(1000, 0.05)


# --------------------------------------------------------------------------------------------------
# Training end to end


def test_dp_manifest_inspect_and_compose(dp_expert, anchor, tmp_path):
    from opacus.accountants import RDPAccountant

    out, m = dp_expert
    dp = m["dp"]
    for key in (
        "epsilon",
        "delta",
        "accountant",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "max_grad_norm",
    ):
        assert key in dp, key
    assert dp["unit"] == "sequence" and dp["steps"] == 4 and dp["clipping"] == "hooks"
    assert dp["delta"] < 1 / dp["private_units"] and dp["sampled_units"] > dp["private_units"]  # public mix
    acc = RDPAccountant()
    for _ in range(dp["steps"]):
        acc.step(noise_multiplier=dp["noise_multiplier"], sample_rate=dp["sample_rate"])
    assert dp["epsilon"] == pytest.approx(acc.get_epsilon(dp["delta"], alphas=P.rdp_orders()))
    assert dp["epsilon"] <= dp["target_epsilon"] == 8.0
    assert all("train_loss" not in h for h in m["history"])  # training losses are not privatised
    r = CliRunner().invoke(app, ["expert", "inspect", str(out)])
    assert r.exit_code == 0 and "DP per sequence" in r.output and "noise multiplier" in r.output
    meta = compose(anchor, [out], tmp_path / "model", provenance=UNSIGNED_OK)
    assert meta["experts"][1]["manifest"]["dp"] == dp
    on_disk = json.loads((tmp_path / "model" / FLEXMOE_JSON).read_text())
    assert on_disk["experts"][1]["manifest"]["dp"]["epsilon"] == dp["epsilon"]


def test_training_stops_before_the_budget(anchor, demo_data, tmp_path):
    from flexmoe.data import blocks_for, load_splits
    from flexmoe.tokenizer import load_tokenizer

    units = len(blocks_for(load_splits([demo_data / "legal"]).train, load_tokenizer(anchor), 64))
    sigma, delta = 0.7, P.default_delta(units)
    budget = P.epsilon_after("rdp", sigma, 4 / units, 3, delta) * (1 + 1e-9)  # enough for 3 steps
    dp = P.DPConfig(epsilon=budget, noise_multiplier=sigma)
    m = train_expert(anchor, [demo_data / "legal"], "lg", tmp_path / "x", steps=40, dp=dp, **KW)
    assert m["dp"]["stopped_at_budget"] and m["dp"]["steps"] == 3 and m["dp"]["planned_steps"] == 40
    assert m["dp"]["epsilon"] <= budget < P.epsilon_after("rdp", sigma, 4 / units, 4, delta)


def test_dp_resume_equals_uninterrupted_and_keeps_the_accounting(anchor, demo_data, tmp_path):
    dp = P.DPConfig(epsilon=4.0, unit="document", noise_seed=7)
    kw = dict(KW, steps=4)
    data = [demo_data / "legal"]
    full = train_expert(anchor, data, "lg", tmp_path / "full", dp=dp, **kw)
    assert train_expert(anchor, data, "lg", tmp_path / "res", dp=dp, stop_after=2, **kw) == {
        "finished": False
    }
    with pytest.raises(FlexmoeError, match="belongs to a DP run"):
        train_expert(anchor, data, "lg", tmp_path / "res", resume=True, **kw)
    with pytest.raises(FlexmoeError, match="other DP settings"):
        train_expert(
            anchor,
            data,
            "lg",
            tmp_path / "res",
            resume=True,
            dp=P.DPConfig(epsilon=2.0, unit="document"),
            **kw,
        )
    res = train_expert(anchor, data, "lg", tmp_path / "res", resume=True, dp=dp, **kw)
    assert res["dp"]["steps"] == full["dp"]["steps"] == 4 and res["dp"]["epsilon"] == full["dp"]["epsilon"]
    assert res["dp"]["unit"] == "document"
    a, b = load_file(str(tmp_path / "full" / TENSOR_FILE)), load_file(str(tmp_path / "res" / TENSOR_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_is_refused_before_training(anchor, demo_data, tmp_path):
    data = [demo_data / "legal"]
    with pytest.raises(FlexmoeError, match="too small for even one training step"):
        train_expert(anchor, data, "lg", tmp_path / "a", steps=10, dp=P.DPConfig(epsilon=0.001), **KW)
    with pytest.raises(FlexmoeError, match="incompatible"):
        train_expert(
            anchor,
            data,
            "lg",
            tmp_path / "b",
            steps=2,
            dp=P.DPConfig(epsilon=8),
            **{**KW, "batch_size": 10**6},
        )
    with pytest.raises(FlexmoeError, match="not below 1/N"):
        train_expert(anchor, data, "lg", tmp_path / "c", steps=2, dp=P.DPConfig(epsilon=8, delta=0.5), **KW)
    with pytest.raises(FlexmoeError, match="not known"):
        train_expert(anchor, data, "lg", tmp_path / "d", steps=2, dp=P.DPConfig(epsilon=8, unit="word"), **KW)
    with pytest.raises(FlexmoeError, match="outside DP-SGD"):
        spec = ExpertSpec(name="lg", router_init="hidden")
        train_expert(
            anchor, data, "lg", tmp_path / "e", steps=2, dp=P.DPConfig(epsilon=8), **{**KW, "spec": spec}
        )
    with pytest.raises(FlexmoeError, match="positive finite"):
        P.DPConfig(epsilon=math.inf).validate()
    assert not any((tmp_path / x).exists() for x in "abcde")


def test_missing_opacus_names_the_extra(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_opacus(name, *a, **k):
        if name == "opacus" or name.startswith("opacus."):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_opacus)
    with pytest.raises(FlexmoeError, match=r"pip install 'flexmoe\[dp\]'"):
        P.require_opacus()


def test_cli_trains_with_dp(anchor, demo_data, tmp_path):
    args = ["expert", "train", "--anchor", str(anchor), "--data", str(demo_data / "math"), "--name", "m"]
    args += ["--out", str(tmp_path / "m"), "--steps", "2", "--batch-size", "4", "--seq-len", "64"]
    args += ["--dp-unit", "document", "--dp-max-grad-norm", "0.5", "--dp-epsilon", "8"]
    r = CliRunner().invoke(app, args)  # the router init defaults to random under DP
    assert r.exit_code == 0, r.output
    assert "DP per document" in r.output and "clipping norm 0.5" in r.output
    r = CliRunner().invoke(app, [*args[:-2], "--dp-epsilon", "0.001", "--out", str(tmp_path / "n")])
    assert r.exit_code != 0 and "too small" in str(r.exception)
