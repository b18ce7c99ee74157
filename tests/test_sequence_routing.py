"""Sequence routing's choice on hand-computed margins: the running mean is causal, padding does not
count, the threshold and the allowed experts hold."""

import torch

from flexmoe.sequence_routing import SequenceRouting, choose


def _margins(rows: list[list[float]]) -> torch.Tensor:
    """One sequence; per position the margins of [public, a, b] (public's is always 0)."""
    return torch.tensor([[[0.0, a, b] for a, b in rows]])


def test_running_mean_picks_the_owner_the_prefix_favours():
    # a: 3, -1, -1 -> running 3, 1, 1/3;  b: 1, 1, 2 -> running 1, 1, 4/3
    m = _margins([[3, 1], [-1, 1], [-1, 2]])
    out = choose(m)[0]
    assert out[:, 0].all()  # public always routable
    assert out[0].tolist() == [True, True, False]  # a leads (3 > 1)
    assert out[1].tolist()[1:] in ([True, False], [False, True])  # a tie: one owner, never both
    assert out[2].tolist() == [True, False, True]  # b leads (4/3 > 1/3)


def test_no_owner_below_the_threshold_and_the_threshold_moves_it():
    m = _margins([[-2, -1], [-2, -1]])  # both rows lose to public on average: public only
    assert choose(m)[0, :, 1:].sum() == 0
    assert choose(m, threshold=-1.5)[0, :, 2].all()  # a lower threshold admits the best one (b)


def test_padding_is_not_counted_and_allowed_experts_hold():
    m = _margins([[-100, 0], [2, 1], [2, 1]])
    pad = torch.tensor([[0, 1, 1]])  # the first position is left padding
    assert choose(m, pad)[0, 1].tolist() == [True, True, False]  # without padding a would trail
    allowed = torch.tensor([True, False, True])  # a excluded (opt-out by mask)
    out = choose(m, pad, allowed)[0]
    assert not out[:, 1].any() and out[1:, 2].all()
    no_public = torch.tensor([False, True, True])
    assert not choose(m, None, no_public)[0, :, 0].any()


def test_causal_later_tokens_never_change_an_earlier_choice():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(2, 12, 4, generator=g)
    m[..., 0] = 0
    changed = m.clone()
    changed[:, 7:] = torch.randn(2, 5, 4, generator=g) * 10
    assert torch.equal(choose(m)[:, :7], choose(changed)[:, :7])


def test_public_only_model_and_decode_steps():
    assert choose(torch.zeros(1, 3, 1)).all()  # no owner: public only

    class Cache:
        def __init__(self, n):
            self.n = n

        def get_seq_length(self):
            return self.n

    s = SequenceRouting()
    cache = Cache(4)
    s._decode[cache] = torch.tensor([[True, False, True]])
    # a decode step (the cache holds tokens) reuses the prefill's last choice, without a model pass
    assert torch.equal(
        s.mask_for_call(None, torch.ones(1, 1, dtype=torch.long), None, cache, None), s._decode[cache]
    )
    s._busy = True  # the anchor pass itself is never narrowed
    assert s.mask_for_call(None, torch.ones(1, 1, dtype=torch.long), None, None, None) is None
