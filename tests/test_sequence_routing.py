"""Sequence routing's choice on hand-computed margins: evidence is a causal (optionally decayed) sum,
padding does not count, and the three outcomes (one owner, public only, undecided) follow the
confidence margin; the allowed experts always hold."""

import math

import torch

from flexmoe.sequence_routing import SequenceRouting, choose, evidence

T, F = True, False


def _margins(rows: list[list[float]]) -> torch.Tensor:
    """One sequence; per position the margins of [public, a, b] (public's is always 0)."""
    return torch.tensor([[[0.0, a, b] for a, b in rows]])


def test_the_owner_the_prefix_favours_by_more_than_the_confidence():
    # evidence a: 3, 2, 1;  b: 1, 2, 4
    out = choose(_margins([[3, 1], [-1, 1], [-1, 2]]), confidence=0.5)[0]
    assert out.tolist() == [[T, T, F], [T, T, T], [T, F, T]]  # a; a tie: undecided (the rows); b
    # a larger confidence leaves the first position undecided too
    assert choose(_margins([[3, 1], [-1, 1], [-1, 2]]), confidence=2.5)[0, 0].tolist() == [T, T, T]


def test_public_only_when_every_owner_is_clearly_behind_public():
    m = _margins([[-2, -1], [-2, -1]])  # evidence a: -2, -4; b: -1, -2
    assert choose(m, confidence=0.5)[0].tolist() == [[T, F, F], [T, F, F]]
    assert choose(m, confidence=1.5)[0].tolist() == [[T, T, T], [T, F, F]]


def test_padding_is_not_evidence_and_allowed_experts_hold():
    m = _margins([[-100, 0], [2, 1], [2, 1]])
    pad = torch.tensor([[0, 1, 1]])  # the first position is left padding
    assert evidence(m, pad)[0, :, 1].tolist() == [0, 2, 4]
    assert choose(m, pad, confidence=0.5)[0, 1].tolist() == [T, T, F]
    no_a = torch.tensor([T, F, T])  # a excluded (opt-out by mask): never routable, b decides alone
    assert choose(m, pad, no_a, confidence=0.5)[0].tolist() == [[T, F, T], [T, F, T], [T, F, T]]
    no_public = torch.tensor([F, T, T])
    assert not choose(m, None, no_public)[0, :, 0].any()


def test_decay_forgets_old_evidence():
    m = _margins([[10, 0], [0, 0], [0, 0], [0, 0]])  # decayed a: 10, 5, 2.5, 1.25
    assert evidence(m, decay=0.5)[0, :, 1].tolist() == [10, 5, 2.5, 1.25]
    assert choose(m, confidence=2, decay=0.5)[0, :, 2].tolist() == [F, F, F, T]  # undecided at the end
    assert choose(m, confidence=2)[0, :, 2].tolist() == [F, F, F, F]  # without decay a stays chosen


def test_switch_follows_a_change_of_domain_that_the_prefix_hides():
    """Six positions of a's text, then b's: the whole prefix keeps a (its lead is spent only slowly);
    with ``switch`` the recent positions' clear owner takes over, and a short blip does not."""
    m = _margins([[3, -3]] * 6 + [[-3, 3]] * 6)
    sr = SequenceRouting(confidence=0.5, switch=math.inf)  # off
    sr.margins = lambda *a, **k: m  # the evidence as given, no model
    prefix = sr.mask(None, torch.zeros(1, 12, dtype=torch.long))[0]
    assert prefix[6:10, 1].all() and not prefix[6:10, 2].any()  # a, b's text notwithstanding
    sr.switch, sr.switch_decay = 4.0, 0.5
    follow = sr.mask(None, torch.zeros(1, 12, dtype=torch.long))[0]
    assert follow[:6].tolist() == [[T, T, F]] * 6  # a's text: a
    assert follow[8:].tolist() == [[T, F, T]] * 4  # two positions into b's text: b
    blip = _margins([[3, -3]] * 6 + [[-1, 1]] + [[3, -3]] * 3)  # one token that looks like b's
    sr.margins = lambda *a, **k: blip
    assert sr.mask(None, torch.zeros(1, 10, dtype=torch.long))[0, :, 2].sum() == 0


def test_a_prompt_that_changes_owner_is_generated_by_where_it_ends():
    """The switch applies to a generation's one choice too, on the scoring evidence only (its margin
    is in that evidence's units)."""
    m = _margins([[3, -3]] * 6 + [[-3, 3]] * 4)  # whole prompt: a leads (18 - 12); its end: b

    class Fixed(SequenceRouting):
        def margins(self, model, input_ids, attention_mask, allowed=None, evidence=None):
            return m

    ids = torch.ones(1, 10, dtype=torch.long)
    assert Fixed().prompt_choice(None, ids).tolist() == [[T, F, T]]  # the default switch: b
    assert Fixed(switch=math.inf).prompt_choice(None, ids).tolist() == [[T, T, F]]  # off: the prefix's a
    other = Fixed(prompt_evidence="rows")  # read by other evidence: not switched
    assert other.prompt_choice(None, ids).tolist() == [[T, T, F]]


def test_causal_later_tokens_never_change_an_earlier_choice():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(2, 12, 4, generator=g)
    m[..., 0] = 0
    changed = m.clone()
    changed[:, 7:] = torch.randn(2, 5, 4, generator=g) * 10
    for decay in (1.0, 0.9):
        assert torch.equal(choose(m, decay=decay)[:, :7], choose(changed, decay=decay)[:, :7])


def test_public_only_model_and_decode_steps():
    assert choose(torch.zeros(1, 3, 1)).all()  # no owner: public only

    class Cache:
        def __init__(self, n):
            self.n = n

        def get_seq_length(self):
            return self.n

    s = SequenceRouting(evidence="rows")
    cache = Cache(4)
    s._decode[cache] = torch.tensor([[T, F, T]])
    one = torch.ones(1, 1, dtype=torch.long)
    # a decode step (the cache holds tokens) reuses the prefill's last choice, without a model pass
    assert torch.equal(s.mask_for_call(None, one, None, cache, None), s._decode[cache])
    s._busy = True  # the anchor pass itself is never narrowed
    assert s.mask_for_call(None, one, None, None, None) is None


def test_generation_commits_at_the_end_of_the_prompt():
    asked = []

    class Fixed(SequenceRouting):
        def margins(self, model, input_ids, attention_mask, allowed=None, evidence=None):
            asked.append(evidence)
            return _margins([[1, 0.5], [1, 0.5]])  # a leads b by 1 at the end: below confidence 8

    class Cache:
        def get_seq_length(self):
            return 0

    ids = torch.ones(1, 2, dtype=torch.long)
    s, cache = Fixed(confidence=8.0), Cache()
    prefill = s.mask_for_call(None, ids, None, cache, None)
    # the whole prompt and what follows: public and a, the prompt's leader at its end
    assert prefill[0].tolist() == [[T, T, F], [T, T, F]]
    assert s._decode[cache].tolist() == [[T, T, F]]
    strict = Fixed(prompt_confidence=8.0)
    strict.mask_for_call(None, ids, None, cache, None)
    assert strict._decode[cache].tolist() == [[T, T, T]]  # below the confidence: left to the rows
    # scoring (no cache) stays causal: by the confidence rule at each position, undecided here
    assert s.mask_for_call(None, ids, None, None, None)[0].tolist() == [[T, T, T], [T, T, T]]
    # unset, the prompt's choice reads the scoring evidence; set, its own (the runtime sets the rows
    # for chat models)
    assert asked[0] == "likelihood" and asked[-1] is None
    Fixed(prompt_evidence="rows").mask_for_call(None, ids, None, Cache(), None)
    assert asked[-1] == "rows"


def test_unknown_evidence_is_refused_with_the_choices():
    import pytest

    from flexmoe.errors import FlexmoeError

    with pytest.raises(FlexmoeError, match="likelihood, rows"):
        SequenceRouting(evidence="vibes")
    assert SequenceRouting().confidence == 0.5 and SequenceRouting(evidence="rows").decay == 0.98
    assert SequenceRouting().switch == 1.0 and SequenceRouting(evidence="rows").switch == math.inf
    for bad in (-1.0, float("nan")):
        with pytest.raises(FlexmoeError, match="switch margin"):
            SequenceRouting(switch=bad)
