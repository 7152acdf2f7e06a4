"""The PPO/GRPO algorithm functions against plain Python loops (one element at a time), to 1e-6."""
from __future__ import annotations

import math

import pytest
import torch

from actors import algos

TOL = 1e-6


def _batch(seed: int = 0, b: int = 5, t: int = 7):
    g = torch.Generator().manual_seed(seed)
    lengths = [t, 1, 3, t - 2, 4][:b]
    mask = torch.zeros(b, t)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    rand = lambda: torch.randn(b, t, generator=g, dtype=torch.float64)
    return mask.double(), rand, g


def _real(mask, i):
    return [t for t in range(mask.shape[1]) if mask[i, t] > 0]


def test_masked_mean_and_whiten_match_loops():
    mask, rand, _ = _batch()
    x = rand()
    vals = [x[i, t].item() for i in range(x.shape[0]) for t in _real(mask, i)]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    assert algos.masked_mean(x, mask).item() == pytest.approx(mean, abs=TOL)
    assert algos.masked_var(x, mask).item() == pytest.approx(var, abs=TOL)
    w = algos.masked_whiten(x, mask, eps=0.0)
    for i in range(x.shape[0]):
        for t in range(x.shape[1]):
            want = (x[i, t].item() - mean) / math.sqrt(var) if mask[i, t] else 0.0
            assert w[i, t].item() == pytest.approx(want, abs=TOL)
    kept = algos.masked_whiten(x, mask, shift_mean=False, eps=0.0)
    assert kept[0, 0].item() == pytest.approx((x[0, 0].item() - mean) / math.sqrt(var) + mean, abs=TOL)


def test_kl_estimators_match_formulas():
    _, rand, _ = _batch(1)
    logp, ref = rand() - 2, rand() - 2
    for est in ("k1", "k2", "k3"):
        got = algos.kl_estimate(logp, ref, est)
        for i in range(logp.shape[0]):
            for t in range(logp.shape[1]):
                p, q = logp[i, t].item(), ref[i, t].item()
                want = {"k1": p - q, "k2": 0.5 * (p - q) ** 2, "k3": math.exp(q - p) - 1 - (q - p)}[est]
                assert got[i, t].item() == pytest.approx(want, abs=TOL, rel=TOL)
    assert (algos.kl_estimate(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="kl_estimator"):
        algos.kl_estimate(logp, ref, "k9")


def test_kl_estimators_are_unbiased_on_samples():
    # k1 and k3 are unbiased estimators of KL(p||q) when tokens are sampled from p.
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    true_kl = float((p * (p / q).log()).sum())
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    for est in ("k1", "k3"):
        value = algos.kl_estimate(p.log()[samples], q.log()[samples], est).mean().item()
        assert value == pytest.approx(true_kl, abs=0.01)


def test_shape_rewards_adds_score_on_last_real_token():
    mask, rand, _ = _batch(2)
    kl = rand()
    scores = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0], dtype=torch.float64)
    got = algos.shape_rewards(scores, kl, mask, kl_coef=0.1)
    for i in range(mask.shape[0]):
        real = _real(mask, i)
        for t in range(mask.shape[1]):
            want = -0.1 * kl[i, t].item() if t in real else 0.0
            if t == real[-1]:
                want += scores[i].item()
            assert got[i, t].item() == pytest.approx(want, abs=TOL)


def _gae_loop(rewards, values, mask, gamma, lam):
    b, t_len = rewards.shape
    adv = [[0.0] * t_len for _ in range(b)]
    for i in range(b):
        real = _real(mask, i)
        last_gae = 0.0
        for k in reversed(range(len(real))):
            t = real[k]
            next_v = values[i, real[k + 1]].item() if k + 1 < len(real) else 0.0
            delta = rewards[i, t].item() + gamma * next_v - values[i, t].item()
            last_gae = delta + gamma * lam * last_gae
            adv[i][t] = last_gae
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_loop(gamma, lam):
    mask, rand, _ = _batch(3)
    rewards, values = rand(), rand()
    adv, ret = algos.gae(rewards, values, mask, gamma, lam)
    want = _gae_loop(rewards, values, mask, gamma, lam)
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            assert adv[i, t].item() == pytest.approx(want[i][t], abs=TOL)
            want_ret = want[i][t] + values[i, t].item() if mask[i, t] else 0.0
            assert ret[i, t].item() == pytest.approx(want_ret, abs=TOL)


def test_gae_with_lambda_one_is_discounted_return_minus_value():
    mask = torch.ones(1, 4, dtype=torch.float64)
    rewards = torch.tensor([[0.0, 0.0, 0.0, 2.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.1, -0.3, 1.0]], dtype=torch.float64)
    adv, ret = algos.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(ret, torch.full_like(ret, 2.0), atol=TOL)
    assert torch.allclose(adv, 2.0 - values, atol=TOL)


def test_policy_loss_matches_loop():
    mask, rand, _ = _batch(4)
    logp, old, adv = rand() * 0.3 - 1, rand() * 0.3 - 1, rand()
    loss, stats = algos.policy_loss(logp, old, adv, mask, clip_eps=0.2)
    terms, clipped = [], []
    for i in range(mask.shape[0]):
        for t in _real(mask, i):
            r = math.exp(logp[i, t].item() - old[i, t].item())
            a = adv[i, t].item()
            u, c = -a * r, -a * min(max(r, 0.8), 1.2)
            terms.append(max(u, c))
            clipped.append(1.0 if c > u else 0.0)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=TOL)
    assert stats["clip_frac"].item() == pytest.approx(sum(clipped) / len(clipped), abs=TOL)


def test_policy_loss_gradient_vanishes_outside_clip_region():
    logp = torch.tensor([[0.5]], dtype=torch.float64, requires_grad=True)  # ratio e^0.5 > 1.2
    loss, _ = algos.policy_loss(logp, torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64),
                                torch.ones(1, 1, dtype=torch.float64), clip_eps=0.2)
    loss.backward()
    assert logp.grad.abs().item() == 0.0


def test_value_loss_matches_loop():
    mask, rand, _ = _batch(5)
    v, old, ret = rand(), rand(), rand()
    loss, stats = algos.value_loss(v, old, ret, mask, clip_eps=0.2)
    terms, fracs = [], []
    for i in range(mask.shape[0]):
        for t in _real(mask, i):
            vv, oo, rr = v[i, t].item(), old[i, t].item(), ret[i, t].item()
            clipped_v = oo + min(max(vv - oo, -0.2), 0.2)
            u, c = (vv - rr) ** 2, (clipped_v - rr) ** 2
            terms.append(0.5 * max(u, c))
            fracs.append(1.0 if c > u else 0.0)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=TOL)
    assert stats["vf_clip_frac"].item() == pytest.approx(sum(fracs) / len(fracs), abs=TOL)
    plain, _ = algos.value_loss(v, old, ret, mask, clip_eps=None)
    want = sum(0.5 * (v[i, t].item() - ret[i, t].item()) ** 2 for i in range(5) for t in _real(mask, i))
    assert plain.item() == pytest.approx(want / mask.sum().item(), abs=TOL)


def test_grpo_advantages_match_loop():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5, 0.5, 0.5, 0.5, -1.0, 1.0, 0.0, 2.0], dtype=torch.float64)
    got = algos.grpo_advantages(scores, group_size=4)
    for g in range(3):
        group = scores[g * 4:(g + 1) * 4].tolist()
        mean = sum(group) / 4
        std = math.sqrt(sum((s - mean) ** 2 for s in group) / 3)
        for k, s in enumerate(group):
            assert got[g * 4 + k].item() == pytest.approx((s - mean) / (std + 1e-6), abs=TOL)
    assert got[4:8].abs().max().item() == 0.0  # equal scores: no signal
    with pytest.raises(ValueError, match="group_size"):
        algos.grpo_advantages(scores[:10], group_size=4)


def test_logprobs_and_entropy_match_loop():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 3), generator=g)
    lp, ent = algos.logprobs_from_logits(logits, labels), algos.entropy_from_logits(logits)
    for i in range(2):
        for t in range(3):
            z = [math.exp(x) for x in logits[i, t].tolist()]
            probs = [x / sum(z) for x in z]
            assert lp[i, t].item() == pytest.approx(math.log(probs[labels[i, t]]), abs=TOL)
            assert ent[i, t].item() == pytest.approx(-sum(p * math.log(p) for p in probs), abs=TOL)


def test_kl_controller_fixed_and_adaptive():
    fixed = algos.KLController(0.05)
    assert fixed.update(100.0, 64) == 0.05
    ctl = algos.KLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 1000)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 1000 / 10000), abs=TOL)
    before = ctl.value
    ctl.update(5.4, 500)  # error -0.1
    assert ctl.value == pytest.approx(before * (1 - 0.1 * 500 / 10000), abs=TOL)


def test_kl_controller_drives_a_simulated_kl_to_its_target():
    # A toy "policy" whose KL falls as the penalty rises (KL = 2 / coef): the loop settles at the target.
    ctl = algos.KLController(0.05, target=4.0, horizon=64)
    for _ in range(400):
        ctl.update(2.0 / ctl.value, 16)
    assert 2.0 / ctl.value == pytest.approx(4.0, rel=0.05)
    floored = algos.KLController(0.05, target=4.0, horizon=64, min_value=0.04)
    for _ in range(50):
        floored.update(0.0, 16)  # KL far below the target: the standard controller would shrink it to ~0
    assert floored.value == 0.04


def test_has_eos_and_adjust_scores():
    responses = torch.tensor([[5, 2, 0], [5, 6, 7], [2, 0, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    ended = algos.has_eos(responses, mask, eos_id=2)
    assert ended.tolist() == [True, False, True]
    assert not algos.has_eos(torch.tensor([[5, 6, 2]]), torch.tensor([[1, 1, 0]]), eos_id=2).item()  # padding
    scores = torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64)
    assert algos.adjust_scores(scores, ended).tolist() == [1.0, 3.0, 5.0]
    assert algos.adjust_scores(scores, ended, missing_eos_penalty=0.5).tolist() == [1.0, 2.5, 5.0]
    whitened = algos.adjust_scores(scores, ended, whiten=True)
    assert whitened.tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)  # mean 3, unbiased std 2
    got = algos.adjust_scores(scores, ended, whiten=True, clip=0.5, missing_eos_penalty=1.0)
    assert got.tolist() == pytest.approx([-0.5, -1.0, 0.5], abs=1e-6)  # whiten, clip, then the penalty


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_dpo_loss_matches_loop(loss_type, smoothing):
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (torch.randn(6, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    beta = 0.3
    loss, stats = algos.dpo_loss(pc, pr, rc, rr, beta, loss_type=loss_type, label_smoothing=smoothing)
    log_sigmoid = lambda x: -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))
    losses, chosen, rejected, wins = [], [], [], 0
    for i in range(6):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        if loss_type == "sigmoid":
            losses.append(-(1 - smoothing) * log_sigmoid(beta * h) - smoothing * log_sigmoid(-beta * h))
        else:
            losses.append((h - 1 / (2 * beta)) ** 2)
        chosen.append(beta * (pc[i].item() - rc[i].item()))
        rejected.append(beta * (pr[i].item() - rr[i].item()))
        wins += chosen[-1] > rejected[-1]
    assert loss.item() == pytest.approx(sum(losses) / 6, abs=TOL)
    assert stats["chosen_reward"].item() == pytest.approx(sum(chosen) / 6, abs=TOL)
    assert stats["rejected_reward"].item() == pytest.approx(sum(rejected) / 6, abs=TOL)
    assert stats["margin"].item() == pytest.approx((sum(chosen) - sum(rejected)) / 6, abs=TOL)
    assert stats["accuracy"].item() == pytest.approx(wins / 6, abs=TOL)


def test_dpo_loss_at_the_reference_is_log2_and_its_gradient_prefers_chosen():
    logps = torch.tensor([-5.0, -7.0], requires_grad=True)
    ref = torch.tensor([-5.0, -7.0])
    loss, stats = algos.dpo_loss(logps[:1], logps[1:], ref[:1], ref[1:], beta=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), abs=TOL) and stats["accuracy"].item() == 0.0
    assert logps.grad[0] < 0 < logps.grad[1]  # descent raises the chosen reply's log-prob, lowers the rejected's
