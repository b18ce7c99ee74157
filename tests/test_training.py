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
    pytest.importorskip("opacus")
    expected = json.loads((FIXTURES / "loss_curves.json").read_text())["curves"]
    got = _curves_module().run_curves(tmp_path)
    for run in ("anchor", "plain", "dp"):
        assert len(got[run]["train_loss"]) == len(expected[run]["train_loss"]), run
        for step, (a, b) in enumerate(zip(got[run]["train_loss"], expected[run]["train_loss"], strict=True)):
            assert a == pytest.approx(b, abs=1e-5), (run, step)
        assert got[run]["valid_loss"] == pytest.approx(expected[run]["valid_loss"], abs=1e-5), run
