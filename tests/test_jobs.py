"""Jobs side by side in worker processes (``flexmoe.jobs``), and what has to cross into them: errors,
trust settings with keys, upcycled baselines saved to disk instead of kept in memory."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from flexmoe.errors import FlexmoeError
from flexmoe.jobs import Job, JobPool, default_workers, job_pool, usable_cpus


def _where(x: int) -> tuple[int, int, int]:
    return x * x, os.getpid(), torch.get_num_threads()


def _refuse(x: int) -> None:
    raise FlexmoeError(f"input {x} is bad.", "pass a good one.")


def test_two_workers_return_results_in_order_from_other_processes_on_their_share_of_cores():
    started, done = [], []
    with job_pool(2) as pool:
        out = pool.run(
            [Job(f"square {i}", _where, (i,)) for i in range(5)],
            on_start=lambda job: started.append(job.name),
            on_done=lambda job, result, seconds: done.append((job.name, result[0], seconds >= 0)),
        )
        again = pool.run([Job("a", _where, (7,)), Job("b", _where, (8,))])
    assert [r[0] for r in out] == [0, 1, 4, 9, 16]
    pids = {r[1] for r in out}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert {r[2] for r in out} == {max(1, usable_cpus() // 2)}
    assert started == [f"square {i}" for i in range(5)]
    assert sorted(done) == sorted((f"square {i}", i * i, True) for i in range(5))
    assert {r[1] for r in again} <= pids  # the same processes serve every run until close


def test_one_worker_runs_here_in_order():
    order = []
    out = JobPool(1).run(
        [Job("x", _where, (3,)), Job("y", _where, (4,))], on_start=lambda job: order.append(job.name)
    )
    assert [r[0] for r in out] == [9, 16] and {r[1] for r in out} == {os.getpid()}
    assert order == ["x", "y"]


def test_a_failing_job_raises_its_own_error_in_the_caller():
    with job_pool(2) as pool, pytest.raises(FlexmoeError) as e:
        pool.run([Job("ok", _where, (2,)), Job("bad", _refuse, (5,))])
    assert e.value.problem == "input 5 is bad." and e.value.fix == "pass a good one."
    with pytest.raises(ValueError, match="at least 1"):
        JobPool(0)


def test_default_workers_follow_the_device():
    assert default_workers("cuda") == 1
    assert default_workers("cpu") == (2 if usable_cpus() >= 2 else 1)


def test_trust_with_pinned_keys_survives_pickling(trust_root):
    from flexmoe.signing import ALLOW_UNSIGNED, Trust

    trust = Trust.from_paths([trust_root / "keys" / "owner.pub"])
    back = pickle.loads(pickle.dumps(trust))
    assert back.keys.keys() == trust.keys.keys() and not back.allow_unsigned
    assert [k.public_bytes_raw() for k in back.keys.values()] == [
        k.public_bytes_raw() for k in trust.keys.values()
    ]
    assert pickle.loads(pickle.dumps(ALLOW_UNSIGNED)) == ALLOW_UNSIGNED
    assert pickle.loads(pickle.dumps(Trust())) == Trust()


def test_upcycled_moe_saved_and_loaded_scores_the_same(tiny_anchor, tmp_path):
    """BTX and the unrestricted MoE are saved for evaluation workers: the loaded model gives the same
    logits, ``load_lm`` reads the directory, and a broken one is refused by name."""
    from flexmoe.anchor import load_anchor
    from flexmoe.evaluate import baselines as B
    from flexmoe.evaluate.run import load_lm
    from flexmoe.tokenizer import load_tokenizer

    base, tok = load_anchor(tiny_anchor), load_tokenizer(tiny_anchor)
    other = load_anchor(tiny_anchor)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    moe = B._moe_from([base, other, base], top_k=2, seed=3).eval()
    B.save_upcycled(moe, tok, tmp_path / "btx", files={"baseline.json": {"steps": 1}})
    assert (tmp_path / "btx" / "baseline.json").is_file()
    ids = torch.randint(0, len(tok), (2, 12))
    with torch.no_grad():
        want = moe(ids).logits
        got = B.load_upcycled(tmp_path / "btx")(ids).logits
        lm = load_lm(tmp_path / "btx", device="cpu")
        via_lm = lm.model(ids).logits
    assert torch.equal(want, got) and torch.equal(want, via_lm) and lm.kv_cache
    (tmp_path / "btx" / "upcycled.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(FlexmoeError, match="does not hold the upcycled MoE"):
        B.load_upcycled(tmp_path / "btx")
