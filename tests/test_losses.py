"""The divergence against hand-computed values and the properties the paper's formulas imply."""

from __future__ import annotations

import math

import pytest
import torch

from vopd_train.losses import (
    aggregate,
    anchor_divergence,
    bucket_divergence,
    bucket_log_probs,
    chunked_divergence,
    distill_divergence,
    importance_weight,
    sampled_token_loss,
    token_weights,
)


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


P_T = [0.7, 0.2, 0.1]
P_S = [0.2, 0.5, 0.3]


def test_hand_computed_kls_and_jsd():
    t, s = logits_of(P_T), logits_of(P_S)
    # KL(T‖S) = .7 ln(.7/.2) + .2 ln(.2/.5) + .1 ln(.1/.3)
    fwd = 0.7 * math.log(3.5) + 0.2 * math.log(0.4) + 0.1 * math.log(1 / 3)
    assert fwd == pytest.approx(0.58381, abs=1e-4)
    assert distill_divergence(s, t, alpha=0.0, topk=None).item() == pytest.approx(fwd, rel=1e-5)
    assert distill_divergence(s, t, alpha=1.0, topk=None).item() == pytest.approx(kl(P_S, P_T), rel=1e-5)
    m = [(a + b) / 2 for a, b in zip(P_T, P_S, strict=True)]  # [.45, .35, .2]
    jsd = 0.5 * kl(P_T, m) + 0.5 * kl(P_S, m)
    assert distill_divergence(s, t, alpha=0.5, topk=None).item() == pytest.approx(jsd, rel=1e-5)


def test_the_defaults_are_the_jsd_over_the_top_100_and_a_tail():
    log_s, log_t = logits_of(P_S).log_softmax(-1), logits_of(P_T).log_softmax(-1)
    m = [(a + b) / 2 for a, b in zip(P_T, P_S, strict=True)]
    assert bucket_divergence(log_s, log_t).item() == pytest.approx(0.5 * kl(P_T, m) + 0.5 * kl(P_S, m), rel=1e-5)
    want = kl(WIDE_BUCKETS_R, WIDE_BUCKETS_S)
    assert distill_divergence(torch.tensor([WIDE_S]), torch.tensor([WIDE_R]), alpha=0.0).item() == pytest.approx(
        want, rel=1e-4)
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match=rf"^alpha must be in \[0, 1\], got {alpha}$"):
            bucket_divergence(log_s, log_t, alpha)


def test_generalised_jsd_weights_the_mixture():
    t, s = logits_of(P_T), logits_of(P_S)
    a = 0.2
    m = [a * x + (1 - a) * y for x, y in zip(P_T, P_S, strict=True)]
    want = a * kl(P_T, m) + (1 - a) * kl(P_S, m)
    assert distill_divergence(s, t, alpha=a, topk=None).item() == pytest.approx(want, rel=1e-5)


def test_jsd_symmetric_bounded_and_zero_on_equal():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(64, 50, generator=g) * 4, torch.randn(64, 50, generator=g) * 4
    ab = distill_divergence(s, t, alpha=0.5, topk=None)
    ba = distill_divergence(t, s, alpha=0.5, topk=None)
    torch.testing.assert_close(ab, ba)
    # disjoint one-hot distributions reach the bound; nothing exceeds it
    far = torch.tensor([[30.0, -30.0]]), torch.tensor([[-30.0, 30.0]])
    assert distill_divergence(*far, alpha=0.5, topk=None).item() == pytest.approx(math.log(2), rel=1e-4)
    assert (ab <= math.log(2) + 1e-6).all() and (ab >= 0).all()
    assert distill_divergence(s, s.clone(), alpha=0.5, topk=10).abs().max().item() < 1e-6


def test_topk_with_tail_equals_full_vocabulary_when_k_covers_it():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 5, 30, generator=g) * 3, torch.randn(8, 5, 30, generator=g) * 3
    for alpha in (0.0, 0.3, 0.5, 1.0):
        full = distill_divergence(s, t, alpha=alpha, topk=None)
        assert full.shape == (8, 5)
        torch.testing.assert_close(distill_divergence(s, t, alpha=alpha, topk=30), full, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(distill_divergence(s, t, alpha=alpha, topk=500), full, rtol=1e-5, atol=1e-6)


def test_topk_buckets_by_hand():
    # student top-2 = ids 1, 2 → buckets (p[1], p[2], tail); the teacher is read at the student's ids
    s, t = logits_of([0.1, 0.5, 0.3, 0.1]), logits_of([0.6, 0.1, 0.2, 0.1])
    log_s, log_t = bucket_log_probs(s, t, topk=2, add_tail=True)
    torch.testing.assert_close(log_s.exp(), torch.tensor([0.5, 0.3, 0.2]), atol=1e-6, rtol=0)
    torch.testing.assert_close(log_t.exp(), torch.tensor([0.1, 0.2, 0.7]), atol=1e-6, rtol=0)
    want = 0.5 * kl([0.1, 0.2, 0.7], [0.3, 0.25, 0.45]) + 0.5 * kl([0.5, 0.3, 0.2], [0.3, 0.25, 0.45])
    assert distill_divergence(s, t, topk=2).item() == pytest.approx(want, rel=1e-5)
    # without the tail both are renormalised over the two ids: S = (.625, .375), T = (1/3, 2/3)
    log_s, log_t = bucket_log_probs(s, t, topk=2, add_tail=False)
    torch.testing.assert_close(log_s.exp(), torch.tensor([0.625, 0.375]), atol=1e-6, rtol=0)
    torch.testing.assert_close(log_t.exp(), torch.tensor([1 / 3, 2 / 3]), atol=1e-6, rtol=0)
    # the same over a [2, 1, 4] batch: every row is renormalised on its own
    log_s, log_t = bucket_log_probs(torch.stack([s, s])[:, None], torch.stack([t, t])[:, None], topk=2, add_tail=False)
    torch.testing.assert_close(log_s.exp(), torch.tensor([0.625, 0.375]).expand(2, 1, 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(log_t.exp(), torch.tensor([1 / 3, 2 / 3]).expand(2, 1, 2), atol=1e-6, rtol=0)
    # k = 1: the student's top id (1) and the tail
    log_s, log_t = bucket_log_probs(s, t, topk=1)
    torch.testing.assert_close(log_s.exp(), torch.tensor([0.5, 0.5]), atol=1e-6, rtol=0)
    torch.testing.assert_close(log_t.exp(), torch.tensor([0.1, 0.9]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="^topk must be ≥ 1 or None, got 0$"):
        bucket_log_probs(s, t, topk=0)
    m = [(0.625 + 1 / 3) / 2, (0.375 + 2 / 3) / 2]
    want = 0.5 * kl([1 / 3, 2 / 3], m) + 0.5 * kl([0.625, 0.375], m)
    assert distill_divergence(s, t, topk=2, add_tail=False).item() == pytest.approx(want, rel=1e-5)


def test_tail_exact_when_topk_mass_approaches_one():
    # the last two tokens hold 1e-9 and 1e-12 of the mass: 1 − Σ top-2 would cancel to 0 (or worse) in float32
    s = torch.tensor([[20.0, 19.0, 20.0 - math.log(1e9) + math.log(1.3133), 0.0]])
    p = torch.softmax(s.double(), -1)[0]
    log_s, _ = bucket_log_probs(s, s.clone(), topk=2, add_tail=True)
    assert torch.isfinite(log_s).all()
    assert log_s[0, 2].item() == pytest.approx(math.log(p[2] + p[3]), rel=1e-5)
    naive = torch.log1p(-torch.softmax(s, -1)[0, :2].sum())  # what 1 − Σp gives in float32
    assert not math.isclose(naive.item(), math.log(p[2] + p[3]), rel_tol=1e-2)
    # the teacher's tail is read outside the student's ids and stays exact too
    t = torch.tensor([[0.0, 0.0, 5.0, 5.0]])
    _, log_t = bucket_log_probs(s, t, topk=2, add_tail=True)
    pt = torch.softmax(t.double(), -1)[0]
    assert log_t[0, 2].item() == pytest.approx(math.log(pt[2] + pt[3]), abs=1e-6)
    # a tail of exactly zero mass (k = V) gives finite losses and finite gradients
    s2 = s.clone().requires_grad_(True)
    loss = distill_divergence(s2, t, topk=4)
    loss.backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s2.grad).all()


def test_only_the_student_gets_gradients():
    g = torch.Generator().manual_seed(2)
    s = (torch.randn(4, 20, generator=g)).requires_grad_(True)
    t = (torch.randn(4, 20, generator=g)).requires_grad_(True)
    for kw in ({"topk": 5}, {"topk": None}, {"topk": 5, "add_tail": False}, {"alpha": 0.0}, {"alpha": 1.0}):
        distill_divergence(s, t, **kw).sum().backward()
        assert t.grad is None
        assert s.grad is not None and s.grad.abs().sum() > 0
        s.grad = None


def test_gradient_points_the_student_toward_the_teacher():
    s = logits_of(P_S).requires_grad_(True)
    t = logits_of(P_T)
    before = distill_divergence(s, t).item()
    distill_divergence(s, t).backward()
    with torch.no_grad():
        s2 = s - 0.5 * s.grad
    assert distill_divergence(s2, t).item() < before


def test_sampled_token_gradient_is_the_log_ratio_times_score():
    s = logits_of(P_S).requires_grad_(True)
    t = logits_of(P_T)
    y = 1
    ls = torch.log_softmax(s, -1)[y]
    lt = torch.log_softmax(t, -1)[y]
    sampled_token_loss(ls, lt).backward()
    ratio = math.log(0.5 / 0.2)
    want = ratio * (torch.nn.functional.one_hot(torch.tensor(y), 3).float() - torch.tensor(P_S))
    torch.testing.assert_close(s.grad, want, rtol=1e-5, atol=1e-6)


def test_importance_weight_clipped_at_two_and_detached():
    new = torch.tensor([0.0, -1.0, -3.0], requires_grad=True)
    old = torch.tensor([0.0, -2.0, -1.0])
    w = importance_weight(new, old)
    torch.testing.assert_close(w, torch.tensor([1.0, 2.0, math.exp(-2.0)]))
    assert not w.requires_grad


def test_importance_weight_holds_the_log_ratio_within_20():
    # a rollout the new policy all but rules out weighs exp(-20), not exp(-30); without a clip the weight of one
    # it strongly prefers stays finite at exp(20)
    low = importance_weight(torch.tensor([-40.0]), torch.tensor([-10.0]))
    assert low.item() == pytest.approx(math.exp(-20.0), rel=1e-5)
    high = importance_weight(torch.tensor([-1.0]), torch.tensor([-31.0]), clip=math.inf)
    assert high.item() == pytest.approx(math.exp(20.0), rel=1e-5)


def test_reductions_seq_mean_then_batch_mean_and_token_mean():
    loss = torch.tensor([[1.0, 3.0, 0.0], [6.0, 0.0, 0.0], [2.0, 2.0, 8.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    # per sequence: 2, 6, 4 → mean 4;  token mean: (1+3+6+2+2+8)/6 = 22/6
    assert aggregate(loss, mask, "seq-mean").item() == pytest.approx(4.0)
    assert aggregate(loss, mask, "token-mean").item() == pytest.approx(22 / 6)
    # an empty sequence does not count in the batch mean
    assert token_weights(torch.tensor([2, 0, 1])).tolist() == pytest.approx([0.25, 0.25, 0.5])
    # seq-mean is the default; one sequence is its own mean; one token weighs 1 under either reduction
    assert aggregate(loss, mask).item() == pytest.approx(4.0)
    assert token_weights(torch.tensor([4])).tolist() == [0.25] * 4
    assert token_weights(torch.tensor([1]), "token-mean").tolist() == [1.0]
    assert token_weights(torch.tensor([0, 0]), "token-mean").tolist() == []
    with pytest.raises(ValueError, match=r"^unknown reduction 'sum'; expected seq-mean or token-mean$"):
        token_weights(torch.tensor([1]), "sum")  # type: ignore[arg-type]


# 102 ids: the student puts logit 1 on ids 0..99, 0.5 on id 100 and 0 on id 101, so its top-100 are ids 0..99
# whatever the tie order and the default buckets are those 100 plus a tail {100, 101}; the reference differs from
# it only inside the tail (logit 3 on id 100). Bucket probabilities written out by hand:
_E = math.e
_ZS = 100 * _E + math.exp(0.5) + 1
_ZR = 100 * _E + math.exp(3.0) + 1
WIDE_S = [1.0] * 100 + [0.5, 0.0]
WIDE_R = [1.0] * 100 + [3.0, 0.0]
WIDE_BUCKETS_S = [_E / _ZS] * 100 + [(math.exp(0.5) + 1) / _ZS]
WIDE_BUCKETS_R = [_E / _ZR] * 100 + [(math.exp(3.0) + 1) / _ZR]


def test_anchor_is_the_forward_kl_from_the_reference_over_the_default_buckets():
    s, r = logits_of(P_S), logits_of(P_T)
    assert anchor_divergence(s, r).item() == pytest.approx(kl(P_T, P_S), rel=1e-5)  # KL(ref ‖ student)
    assert anchor_divergence(s, s.clone()).item() == 0.0  # exactly, not merely small
    wide_s, wide_r = torch.tensor([WIDE_S]), torch.tensor([WIDE_R])
    want = kl(WIDE_BUCKETS_R, WIDE_BUCKETS_S)  # top-100 + tail, KL(ref ‖ student)
    assert anchor_divergence(wide_s, wide_r).item() == pytest.approx(want, rel=1e-4)
    full = kl([math.exp(x) / _ZR for x in WIDE_R], [math.exp(x) / _ZS for x in WIDE_S])
    assert anchor_divergence(wide_s, wide_r, topk=None).item() == pytest.approx(full, rel=1e-4)
    assert abs(want - full) > 1e-3  # the buckets matter here
    log_s, log_t = bucket_log_probs(wide_s, wide_r)  # the same default buckets, read directly
    torch.testing.assert_close(log_s.exp()[0], torch.tensor(WIDE_BUCKETS_S), rtol=1e-5, atol=0)
    torch.testing.assert_close(log_t.exp()[0], torch.tensor(WIDE_BUCKETS_R), rtol=1e-5, atol=0)


def test_bucket_log_probs_refuses_logits_of_different_shapes():
    with pytest.raises(ValueError, match=r"^student logits \(2, 3\) and teacher logits \(2, 4\) differ in shape$"):
        bucket_log_probs(torch.zeros(2, 3), torch.zeros(2, 4))


@pytest.mark.parametrize("objective,kw", [("logits", {"topk": 7}), ("logits", {"topk": None}),
                                          ("logits", {"topk": 7, "add_tail": False, "alpha": 0.0}),
                                          ("sampled-token", {})])
def test_chunked_equals_unchunked(objective, kw):
    torch.manual_seed(3)  # the heads' init draws from the global generator: fix it, whatever ran before
    g = torch.Generator().manual_seed(3)
    n, h, v = 23, 8, 40
    head = torch.nn.Linear(h, v, bias=False)
    t_head = torch.nn.Linear(h, v, bias=False)
    hs = torch.randn(n, h, generator=g, requires_grad=True)
    ht = torch.randn(n, h, generator=g)
    ids = torch.randint(0, v, (n,), generator=g)

    ref_logits = head(hs)
    t_logits = t_head(ht)
    if objective == "logits":
        ref = distill_divergence(ref_logits, t_logits, **kw)
    else:
        ls = torch.log_softmax(ref_logits, -1).gather(-1, ids[:, None])[:, 0]
        ref = sampled_token_loss(ls, torch.log_softmax(t_logits, -1).gather(-1, ids[:, None])[:, 0])
    (ref * torch.arange(n)).sum().backward()
    ref_gh, ref_gw = hs.grad.clone(), head.weight.grad.clone()
    hs.grad, head.weight.grad = None, None

    out = chunked_divergence(hs, ht, head, t_head, ids, objective=objective, chunk_size=5, **kw)
    # Chunking changes the float32 summation order; log-probs of a few units agree to ~1e-6 absolute.
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-5, atol=5e-6)
    (out.loss * torch.arange(n)).sum().backward()
    torch.testing.assert_close(hs.grad, ref_gh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, ref_gw, rtol=1e-4, atol=1e-5)
    assert t_head.weight.grad is None
    # statistics against a direct computation
    agree = ref_logits.argmax(-1) == t_logits.argmax(-1)
    assert torch.equal(out.agree, agree)
    p = torch.softmax(ref_logits.detach(), -1)
    torch.testing.assert_close(out.entropy, -(p * p.log()).sum(-1), rtol=1e-5, atol=1e-6)


def test_chunked_statistics_and_temperature_by_hand():
    """Identity heads over hidden states that are twice the log-probabilities: at temperature 2 the two models
    are exactly the distributions below, so every output is a hand-computed number."""
    identity = lambda x: x  # noqa: E731
    student = [P_S, P_T, P_S]  # top-1: ids 1, 0, 1
    teacher = [[0.1, 0.6, 0.3], [0.8, 0.1, 0.1], P_T]  # top-1: ids 1, 0, 0
    # shifted by 1: logits, not log-probabilities, so the normalisation is part of what is checked
    hs = 2 * (torch.stack([logits_of(p) for p in student]) + 1)
    ht = 2 * (torch.stack([logits_of(p) for p in teacher]) + 1)
    ids = torch.tensor([0, 1, 2])
    out = chunked_divergence(hs, ht, identity, identity, ids, topk=None, temperature=2.0, chunk_size=2)

    def jsd(p, q):
        m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
        return 0.5 * kl(p, m) + 0.5 * kl(q, m)

    torch.testing.assert_close(out.loss, torch.tensor([jsd(s, t) for s, t in zip(student, teacher, strict=True)]),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(out.student_logp, torch.tensor([0.2, 0.2, 0.3]).log(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.teacher_logp, torch.tensor([0.1, 0.1, 0.1]).log(), rtol=1e-5, atol=1e-6)
    assert out.agree.tolist() == [True, True, False]
    entropy = [-sum(p * math.log(p) for p in row) for row in student]
    torch.testing.assert_close(out.entropy, torch.tensor(entropy), rtol=1e-5, atol=0)


def test_chunked_default_buckets_are_the_students_top_100_and_a_tail():
    identity = lambda x: x  # noqa: E731
    out = chunked_divergence(torch.tensor([WIDE_S]), torch.tensor([WIDE_R]), identity, identity, torch.tensor([0]),
                             alpha=0.0)
    assert out.loss.item() == pytest.approx(kl(WIDE_BUCKETS_R, WIDE_BUCKETS_S), rel=1e-4)


def test_chunked_with_no_tokens_returns_empty_columns():
    identity = lambda x: x  # noqa: E731
    out = chunked_divergence(torch.zeros(0, 3, dtype=torch.bfloat16), torch.zeros(0, 3, dtype=torch.bfloat16),
                             identity, identity, torch.zeros(0, dtype=torch.long))
    for name in ("loss", "student_logp", "teacher_logp", "entropy"):
        col = getattr(out, name)
        assert col.shape == (0,) and col.dtype == torch.float32, name  # float32 whatever the hidden dtype
    assert out.agree.shape == (0,) and out.agree.dtype == torch.bool


class CountingHead(torch.nn.Linear):
    calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


@pytest.mark.parametrize("checkpoint,hidden_grad,calls", [
    (True, True, 4),  # two chunks, each projected again in the backward pass: no [N, V] logits kept
    (False, True, 2),
    (True, False, 2),  # hidden states that need no gradient take the plain path (the head still gets one)
    (False, False, 2),
])
def test_checkpointing_recomputes_each_chunk_in_the_backward_pass(checkpoint, hidden_grad, calls):
    g = torch.Generator().manual_seed(5)
    head, t_head = CountingHead(4, 9, bias=False), torch.nn.Linear(4, 9, bias=False)
    hs = torch.randn(6, 4, generator=g).requires_grad_(hidden_grad)
    ht = torch.randn(6, 4, generator=g)
    kw = {} if checkpoint else {"checkpoint": False}  # on by default
    out = chunked_divergence(hs, ht, head, t_head, torch.zeros(6, dtype=torch.long), chunk_size=3, **kw)
    out.loss.sum().backward()
    assert head.calls == calls and head.weight.grad is not None


@pytest.mark.parametrize("n_teacher,n_ids", [(4, 5), (5, 4)])
def test_chunked_refuses_token_counts_that_differ(n_teacher, n_ids):
    identity = lambda x: x  # noqa: E731
    with pytest.raises(ValueError, match="^student hidden, teacher hidden and target ids must hold the same number "
                                         "of tokens$"):
        chunked_divergence(torch.zeros(5, 3), torch.zeros(n_teacher, 3), identity, identity,
                           torch.zeros(n_ids, dtype=torch.long))


def test_trust_region_teacher_moves_toward_student():
    g = torch.Generator().manual_seed(4)
    head, t_head = torch.nn.Linear(4, 9, bias=False), torch.nn.Linear(4, 9, bias=False)
    hs, ht = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    ids = torch.zeros(6, dtype=torch.long)
    full = chunked_divergence(hs, ht, head, t_head, ids, topk=None, trust_region_rate=0.0).loss
    with torch.no_grad():
        mixed = torch.lerp(t_head(ht), head(hs), 0.25)
        want = distill_divergence(head(hs), mixed, topk=None)
    got = chunked_divergence(hs, ht, head, t_head, ids, topk=None, trust_region_rate=0.25).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got <= full + 1e-7).all()
    assert chunked_divergence(hs, ht, head, t_head, ids, topk=None, trust_region_rate=1.0).loss.abs().max() < 1e-6
