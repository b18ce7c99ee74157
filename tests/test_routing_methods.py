"""Compose-time routing methods: hand-built cases for each rule, folding, recomputation on opt-out,
owner statistics from the owner's own data only, and the auxiliary mine-vs-public loss."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from flexmoe import routing_methods as M
from flexmoe.compose import FLEXMOE_JSON, UNSIGNED_OK, ComposeSettings, compose, remove
from flexmoe.errors import FlexmoeError
from flexmoe.routing_stats import (
    OWNER_FILE,
    compute_for_package,
    constant_direction,
    load_owner_stats,
    publish_anchor_stats,
    regularised,
)
from flexmoe.signing import ALLOW_UNSIGNED

H = 6


def _margin_stats(rows, bias, j, h):
    m = h @ (rows[j] - rows[0]) + bias[j] - bias[0]
    return torch.stack([m.mean(), m.std()])


def _inputs_from_points(rows, bias, own_points, public_points):
    """Owner statistics exactly as an owner computes them, from points in router-input space."""
    owner = {}
    names = ["public"] + [f"o{j}" for j in range(1, len(rows))]
    for j in range(1, len(rows)):
        owner[names[j]] = {
            "layers.0.margin_own": _margin_stats(rows, bias, j, own_points[j - 1]),
            "layers.0.margin_public": _margin_stats(rows, bias, j, public_points),
            "layers.0.mean_own": own_points[j - 1].mean(0),
        }
    mu = public_points.mean(0)
    cov = torch.cov(public_points.T, correction=0)
    u, cv = constant_direction(mu, cov)
    anchor = {
        "layers.0.mean": mu,
        "layers.0.cov": cov,
        "layers.0.const": u,
        "layers.0.const_cv": torch.tensor(cv),
    }
    return M.Inputs(names, [rows], [bias], owner, anchor)


def _points(seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.zeros(H, dtype=torch.float64)
    base[0] = 10.0  # a nearly constant component, as in a residual stream
    pub = base + torch.randn(400, H, generator=g, dtype=torch.float64)
    pub[:, 0] = 10.0 + 0.01 * torch.randn(400, generator=g, dtype=torch.float64)
    own1 = pub[:200] + torch.tensor([0, 2.0, 0, 0, 0, 0], dtype=torch.float64)
    own2 = pub[200:] + torch.tensor([0, 0, 1.0, 0, 0, 0], dtype=torch.float64)
    rows = torch.randn(3, H, generator=g, dtype=torch.float64)
    rows[1] = rows[0] + torch.tensor([0, 0.5, 0, 0, 0, 0], dtype=torch.float64)  # weak row
    rows[2] = rows[0] + torch.tensor([0, 0, 4.0, 0, 0, 0], dtype=torch.float64)  # strong row
    bias = torch.tensor([0.0, -0.3, -1.0], dtype=torch.float64)
    return rows, bias, [own1, own2], pub


def test_calibration_maps_each_rows_margin_distribution_onto_the_same_points():
    rows, bias, own, pub = _points()
    inp = _inputs_from_points(rows, bias, own, pub)
    before = [float(_margin_stats(rows, bias, j, own[j - 1])[0]) for j in (1, 2)]
    assert abs(before[0] - before[1]) > 1.0  # the two rows mean different things before
    new_rows, new_bias, rec = M.plan("calibrated", inp, "keep")
    r, b = new_rows[0], new_bias[0]
    own_means = [float(_margin_stats(r, b, j, own[j - 1])[0]) for j in (1, 2)]
    pub_means = [float(_margin_stats(r, b, j, pub)[0]) for j in (1, 2)]
    assert own_means[0] == pytest.approx(own_means[1], abs=1e-9)
    assert pub_means[0] == pytest.approx(pub_means[1], abs=1e-9)
    assert own_means[0] > pub_means[0]
    assert float(b.max()) == 0.0 and rec["method"] == "calibrated" and rec["bias"] == "keep"


def test_calibration_bounds_the_scale_of_a_row_that_does_not_separate_its_text():
    rows, bias, own, pub = _points()
    inp = _inputs_from_points(rows, bias, own, pub)
    inp.owner["o1"]["layers.0.margin_own"] = inp.owner["o1"]["layers.0.margin_public"] - 0.5
    new_rows, _, _ = M.plan("calibrated", inp, "keep")
    scale = (new_rows[0][1] - new_rows[0][0]).norm() / (rows[1] - rows[0]).norm()
    assert float(scale) == pytest.approx(M.MAX_SCALE)


def test_lda_rows_equal_the_closed_form():
    rows, bias, own, pub = _points(1)
    inp = _inputs_from_points(rows, bias, own, pub)
    w, b, _ = M.plan("lda", inp, "keep")
    S = regularised(inp.anchor["layers.0.cov"])
    means = torch.stack([pub.mean(0), own[0].mean(0), own[1].mean(0)])
    # Gaussian log-likelihood with a shared covariance, up to what is common to all classes.
    h = pub[:5]
    prec = torch.linalg.inv(S)
    ll = torch.stack([-0.5 * ((h - m) @ prec * (h - m)).sum(1) for m in means], 1)
    got = h @ w[0].T + b[0]
    torch.testing.assert_close(got - got[:, :1], ll - ll[:, :1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(w[0], torch.linalg.solve(S, means.T).T)


def test_gated_keeps_the_trained_margin_at_each_owners_mean_and_lowers_it_elsewhere():
    rows, bias, own, pub = _points(4)
    inp = _inputs_from_points(rows, bias, own, pub)
    g_rows, g_bias, _ = M.plan("gated@0.5", inp, "keep")
    t_rows, t_bias, _ = M.plan("trained", inp, "keep")
    for j in (1, 2):
        h = own[j - 1].mean(0)
        gated_margin = h @ (g_rows[0][j] - g_rows[0][0]) + g_bias[0][j] - g_bias[0][0]
        trained_margin = h @ (t_rows[0][j] - t_rows[0][0]) + t_bias[0][j] - t_bias[0][0]
        assert float(gated_margin) == pytest.approx(float(trained_margin), abs=1e-9)
        other = own[2 - j].mean(0)  # the other owner's text: this owner's claim goes down
        g_other = other @ (g_rows[0][j] - g_rows[0][0]) + g_bias[0][j] - g_bias[0][0]
        t_other = other @ (t_rows[0][j] - t_rows[0][0]) + t_bias[0][j] - t_bias[0][0]
        assert float(g_other) < float(t_other)


def test_exclusive_lowers_an_intruding_row_to_the_target_and_keeps_own_and_public_means():
    rows, bias, own, pub = _points(5)
    rows[1] = rows[0] + torch.tensor([0, 0.5, 6.0, 0, 0, 0], dtype=torch.float64)  # o1 also fires on o2's
    inp = _inputs_from_points(rows, bias, own, pub)
    k = 1.0
    x_rows, _, _ = M.plan(f"exclusive@{k}", inp, "keep")
    x = x_rows[0]
    mu_pub, mu1, mu2 = pub.mean(0), own[0].mean(0), own[1].mean(0)
    S = regularised(torch.cov(pub.T, correction=0))
    diff = rows[1] - rows[2]
    before = float(diff @ mu2)
    assert before > 0  # o1 outscores o2 on o2's own mean: an intruder
    target = -k * float((diff @ S @ diff).sqrt())
    assert float(x[1] @ mu2 - rows[2] @ mu2) == pytest.approx(target, abs=1e-4)
    assert float(x[1] @ mu1) == pytest.approx(float(rows[1] @ mu1), abs=1e-4)  # own mean kept
    assert float(x[1] @ mu_pub) == pytest.approx(float(rows[1] @ mu_pub), abs=1e-4)  # public mean kept
    torch.testing.assert_close(x[0], rows[0])  # the public row is never touched
    # rows that never outscore each other on the other's mean are left alone at k = 0
    rows, bias, own, pub = _points(5)
    inp = _inputs_from_points(rows, bias, own, pub)
    torch.testing.assert_close(M.plan("exclusive@0", inp, "keep")[0][0], rows)


def test_folding_a_bias_rides_on_the_nearly_constant_direction():
    rows, bias, own, pub = _points(2)
    inp = _inputs_from_points(rows, bias, own, pub)
    kept_rows, kept_bias, _ = M.plan("lda", inp, "keep")
    fold_rows, fold_bias, rec = M.plan("lda", inp, "fold")
    assert float(fold_bias[0].abs().max()) == 0.0
    exact = pub @ kept_rows[0].T + kept_bias[0]
    folded = pub @ fold_rows[0].T
    diff = (folded - exact) - (folded - exact)[:, :1]  # a common shift does not change routing
    assert float(diff.abs().max()) < 0.05 * float(kept_bias[0].abs().max())
    assert rec["fold_spread"][0] < 0.01


def test_prior_raises_the_public_logit_by_log_owners():
    rows, bias, own, pub = _points(3)
    inp = _inputs_from_points(rows, bias, own, pub)
    _, b0, _ = M.plan("trained", inp, "keep")
    _, b1, _ = M.plan("trained+prior", inp, "keep")
    gap0, gap1 = b0[0][0] - b0[0][1:], b1[0][0] - b1[0][1:]
    torch.testing.assert_close(gap1 - gap0, torch.full_like(gap0, math.log(2)))


def test_unknown_method_and_missing_statistics_are_clear_errors():
    with pytest.raises(FlexmoeError, match="Unknown routing method"):
        M.parse("magic")
    rows, bias, own, pub = _points()
    inp = _inputs_from_points(rows, bias, own, pub)
    inp.owner.pop("o2")
    with pytest.raises(FlexmoeError, match="no routing statistics"):
        M.plan("calibrated", inp)


# --------------------------------------------------------------------------------------------------
# End to end on the tiny anchor

OWNERS = ("code", "math", "legal")


@pytest.fixture(scope="module")
def routed(tiny_anchor, demo_data, tmp_path_factory):
    from flexmoe.expert.train import ExpertSpec, train_expert

    root = tmp_path_factory.mktemp("routed")
    publish_anchor_stats(tiny_anchor, [demo_data / "public"])
    for d in OWNERS:
        spec = ExpertSpec(name=d, router_init="hidden", router_aux_loss=0.1 if d == "code" else 0.0)
        train_expert(
            tiny_anchor,
            [demo_data / d],
            d,
            root / d,
            steps=4,
            quiet=True,
            spec=spec,
            public=[demo_data / "public"],
        )
        compute_for_package(tiny_anchor, root / d, [demo_data / d], [demo_data / "public"])
    return root


def test_owner_statistics_come_from_its_own_validation_data_only(routed, tiny_anchor, demo_data, tmp_path):
    import shutil

    rec = json.loads((routed / "math" / "routing_stats.json").read_text())
    assert rec["own"]["split"] == "valid" and rec["public"]["split"] == "train"
    before = load_owner_stats(routed / "math")
    # The same owner data with every other domain's files and its own test split gone: same numbers.
    mine = tmp_path / "mine"
    mine.mkdir()
    for split in ("train", "valid"):
        shutil.copy2(demo_data / "math" / f"{split}.jsonl", mine / f"{split}.jsonl")
    pkg = tmp_path / "pkg"
    shutil.copytree(routed / "math", pkg)
    compute_for_package(tiny_anchor, pkg, [mine], [demo_data / "public"])
    after = load_owner_stats(pkg)
    for k in before:
        torch.testing.assert_close(before[k], after[k])
    # Tampering is refused.
    (pkg / OWNER_FILE).write_bytes((pkg / OWNER_FILE).read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(FlexmoeError, match="stale or tampered"):
        load_owner_stats(pkg)


@pytest.mark.parametrize("method", ["lda", "calibrated", "phatgoose"])
def test_folded_stock_export_equals_runtime_and_opt_out_recomputes(routed, tiny_anchor, tmp_path, method):
    from flexmoe.runtime import from_pretrained

    compose(
        tiny_anchor,
        [routed / d for d in OWNERS],
        tmp_path / "all",
        ComposeSettings(routing=method, top_k=2),
        provenance=UNSIGNED_OK,
    )
    meta = json.loads((tmp_path / "all" / FLEXMOE_JSON).read_text())
    assert meta["routing"]["method"] == method and meta["routing"]["bias"] == "fold"
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "all")).eval()
    ours = from_pretrained(tmp_path / "all", trust=ALLOW_UNSIGNED)
    x = torch.randint(0, hf.config.vocab_size, (2, 16))
    torch.testing.assert_close(ours.model(x).logits, hf(x).logits, atol=1e-5, rtol=1e-5)
    # Opt-out recomputes the method from what remains: equal to composing the remaining owners.
    remove(tmp_path / "all", "math", tmp_path / "removed")
    compose(
        tiny_anchor,
        [routed / "code", routed / "legal"],
        tmp_path / "fresh",
        ComposeSettings(routing=method, top_k=2),
        provenance=UNSIGNED_OK,
    )
    a = load_file(str(tmp_path / "removed" / "model.safetensors"))
    b = load_file(str(tmp_path / "fresh" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rec = json.loads((tmp_path / "removed" / FLEXMOE_JSON).read_text())["routing"]
    assert rec["method"] == method and rec["experts"] == ["public", "code", "legal"]
    # ... and the removed owner's statistics are gone from the routed model.
    kept = load_file(str(tmp_path / "removed" / M.ROUTING_FILE))
    assert not any("/math/" in k for k in kept)


def test_kept_bias_is_exact_in_the_runtime_and_dropped_by_the_export(routed, tiny_anchor, tmp_path):
    from flexmoe.runtime import from_pretrained

    compose(
        tiny_anchor,
        [routed / d for d in OWNERS],
        tmp_path / "m",
        ComposeSettings(routing="lda", routing_bias="keep"),
        provenance=UNSIGNED_OK,
    )
    bias = load_file(str(tmp_path / "m" / "flexmoe_bias.safetensors"))
    assert all(float(v.max()) == 0.0 and float(v.min()) < 0 for v in bias.values())
    x = torch.randint(0, 500, (1, 12))
    with_bias = from_pretrained(tmp_path / "m", use_bias=True, trust=ALLOW_UNSIGNED).model(x).logits
    without = from_pretrained(tmp_path / "m", trust=ALLOW_UNSIGNED).model(x).logits
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()(x).logits
    torch.testing.assert_close(without, hf, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(with_bias, without)


def test_aux_loss_is_recorded_and_labels_public_blocks():
    from flexmoe.expert.router_aux import MineVsPublic

    public = torch.arange(12).view(3, 4)
    aux = MineVsPublic.__new__(MineVsPublic)
    aux.public = {bytes(b.numpy().tobytes()) for b in public}
    batch = torch.stack([public[1], public[0] + 100, public[2]])
    assert aux.labels(batch).tolist() == [0.0, 1.0, 0.0]


def test_aux_loss_pushes_the_margin_towards_mine_and_public(tiny_anchor):
    from flexmoe.anchor import load_anchor
    from flexmoe.expert.router_aux import MineVsPublic
    from flexmoe.moe import anchored_expert_model, moe_blocks

    torch.manual_seed(0)
    model = load_anchor(tiny_anchor)
    L, Hs = model.config.num_hidden_layers, model.config.hidden_size
    anchored_expert_model(model, torch.zeros(L, Hs), torch.zeros(L, Hs))
    own, pub = torch.randint(0, 500, (2, 16)), torch.randint(500, 1000, (2, 16))
    aux = MineVsPublic(model, pub)
    rows = [b.router[1].weight for b in moe_blocks(model)]
    opt = torch.optim.SGD(rows, lr=0.05)
    batch = torch.cat([own, pub])
    losses = []
    for _ in range(5):
        model(input_ids=batch)
        loss = aux.loss(batch)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    aux.close()
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # zero rows: no opinion yet
    assert losses[-1] < losses[0]
