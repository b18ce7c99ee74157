"""The one training loop: it reproduces the loss curves recorded before it was refactored (anchor
pretraining, plain and DP expert training), and its pluggable pieces behave as documented."""

import importlib.util
import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def _curves_module():
    spec = importlib.util.spec_from_file_location("make_loss_curves", FIXTURES / "make_loss_curves.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_loop_reproduces_recorded_loss_curves(tmp_path):
    """The three float64 reference runs of tests/fixtures/make_loss_curves.py agree with the recorded
    curves to 1e-5 per step. Other CPUs' kernels (AVX2 or AVX-512, MKL's code path, threads) moved
    them by 4e-10 at most (in float32, by up to 0.13), so a difference here is a change of the loop."""
    pytest.importorskip("opacus")
    module = _curves_module()
    recorded = json.loads((FIXTURES / "loss_curves.json").read_text())
    assert recorded["dtype"] == module.DTYPE, "regenerate tests/fixtures/loss_curves.json"
    expected = recorded["curves"]
    got = module.run_curves(tmp_path)
    for run in ("anchor", "plain", "dp"):
        assert len(got[run]["train_loss"]) == len(expected[run]["train_loss"]), run
        for step, (a, b) in enumerate(zip(got[run]["train_loss"], expected[run]["train_loss"], strict=True)):
            assert a == pytest.approx(b, abs=1e-5), (run, step)
        assert got[run]["valid_loss"] == pytest.approx(expected[run]["valid_loss"], abs=1e-5), run


# --------------------------------------------------------------------------------------------------
# The loop's pieces on toy models (fast).

import torch  # noqa: E402

from flexmoe.errors import FlexmoeError  # noqa: E402
from flexmoe.training import (  # noqa: E402
    IGNORE,
    LabeledRows,
    LMStep,
    PackedBlocks,
    RunOptions,
    Stage,
    TrainConfig,
    compile_layers_,
    cpu_dtype,
    evaluate,
    frozen_to_bf16_,
    lm_loss,
    train,
)


class Toy(torch.nn.Module):
    """One trainable scalar; training pulls it towards +1 while validation wants -1, so validation
    gets worse from the first step on: the case early stopping is for."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))


def _toy_loss(m, batch):
    target = 1.0 if m.training else -1.0
    return (m.w - target) ** 2 + 0 * batch.float().sum()


def _toy_run(tmp_path, **cfg_kw):
    model = Toy()
    cfg = TrainConfig(
        steps=10, batch_size=2, lr=0.1, warmup_steps=1, eval_every=1, log_every=1, grad_clip=0, **cfg_kw
    )
    blocks = torch.zeros(8, 4, dtype=torch.long)
    stage = Stage(PackedBlocks(blocks), blocks[:2], LMStep(_toy_loss), desc="toy")
    return model, cfg, stage


def test_early_stopping_keeps_the_best_weights(tmp_path):
    model, cfg, stage = _toy_run(tmp_path, early_stop=2)
    weights = []
    stage.after_step = lambda: weights.append(float(model.w.detach()))
    result = train(model, cfg, stage, RunOptions(quiet=True))
    assert result.stopped_early and result.best_step == 1
    assert len(weights) == 3  # steps 2 and 3 were worse: patience 2 ends the run after step 3
    assert float(model.w.detach()) == pytest.approx(weights[0])  # step 1's weights restored
    assert result.final_valid_loss == pytest.approx((weights[0] + 1) ** 2)
    off = train(*_toy_run(tmp_path, early_stop=0), RunOptions(quiet=True))
    assert not off.stopped_early and off.best_step is None and off.history[-1]["step"] == 10


def test_early_stopping_survives_resume(tmp_path):
    full = Toy()
    _, cfg, stage = _toy_run(tmp_path, early_stop=3, checkpoint_every=1)
    r_full = train(full, cfg, stage, RunOptions(quiet=True))
    part = Toy()
    run = RunOptions(tmp_path / "ck", stop_after=2, quiet=True)
    assert train(part, cfg, stage, run).final_valid_loss is None
    resumed = Toy()
    r = train(resumed, cfg, stage, RunOptions(tmp_path / "ck", resume=True, quiet=True))
    assert (r.best_step, r.stopped_early) == (r_full.best_step, r_full.stopped_early)
    assert torch.equal(resumed.w, full.w)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedules(schedule):
    cfg = TrainConfig(steps=10, lr=1.0, warmup_steps=2, min_lr_ratio=0.1, schedule=schedule)
    lrs = [cfg.lr_at(s) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0]
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))
    end = cfg.lr_at(10)
    assert end == pytest.approx({"cosine": 0.1, "linear": 0.0, "constant": 1.0}[schedule])
    with pytest.raises(FlexmoeError, match="schedule"):
        train(Toy(), TrainConfig(schedule="step"), Stage(PackedBlocks(torch.zeros(2, 2)), torch.zeros(2, 2)))


def _tiny_lm(seed=0):
    from transformers import Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(seed)
    cfg = Olmo2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return Olmo2ForCausalLM(cfg)


def test_labeled_rows_train_only_where_labels_are_set():
    model = _tiny_lm()
    ids = torch.randint(0, 64, (4, 16))
    labels = ids.clone()
    labels[:, :8] = IGNORE  # a prompt: no loss on its tokens
    masked = float(lm_loss(model, (ids, labels)).detach())
    assert masked != pytest.approx(float(lm_loss(model, ids).detach()))
    # Changing tokens' labels inside the prompt changes nothing; the loss equals the loss of the
    # second half alone.
    logits = model(input_ids=ids).logits[:, 7:-1]
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), ids[:, 8:].reshape(-1))
    assert masked == pytest.approx(float(manual), rel=1e-5)
    cfg = TrainConfig(steps=3, batch_size=2, lr=1e-2, warmup_steps=1, eval_every=3, log_every=1)
    stage = Stage(LabeledRows(ids, labels), (ids, labels), desc="sft")
    r = train(model, cfg, stage, RunOptions(quiet=True))
    assert r.final_valid_loss < r.initial_valid_loss
    assert evaluate(model, (ids, labels), 2) == pytest.approx(r.final_valid_loss)
    with pytest.raises(FlexmoeError, match="differ in shape"):
        LabeledRows(ids, labels[:, :4])


def test_lm_loss_is_hf_loss_and_keeps_float64():
    """lm_loss computes HF's causal LM loss itself (HF's rounds float64 logits to fp32)."""
    model = _tiny_lm()
    ids = torch.randint(0, 64, (3, 12))
    labels = ids.clone()
    labels[:, :5] = IGNORE
    for batch, hf_labels in ((ids, ids), ((ids, labels), labels)):
        want = model(input_ids=ids, labels=hf_labels).loss
        torch.testing.assert_close(lm_loss(model, batch), want)
    model = model.to(cpu_dtype("float64"))
    assert lm_loss(model, ids).dtype == torch.float64
    with pytest.raises(FlexmoeError, match="not supported"):
        cpu_dtype("float16")


def test_compile_per_decoder_layer_keeps_the_outputs():
    """The wiring of --compile: every decoder layer compiled, same logits (the eager backend keeps the
    test fast on CPU; GPUs use inductor)."""
    model = _tiny_lm().eval()
    x = torch.randint(0, 64, (2, 8))
    want = model(input_ids=x).logits
    compile_layers_(model, backend="eager")
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    torch.testing.assert_close(model(input_ids=x).logits, want)


def test_frozen_weights_go_to_bf16_trainable_stay_fp32():
    model = _tiny_lm()
    for n, p in model.named_parameters():
        p.requires_grad_("mlp" in n)
    assert frozen_to_bf16_(model) > 0
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if "mlp" in n else torch.bfloat16), n
