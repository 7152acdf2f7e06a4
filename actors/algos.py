"""The PPO/GRPO algorithm pieces as pure tensor functions (no Ray, no models), tested against plain loops.

Shapes: ``[B, T]`` tensors cover the response tokens (actions) of B rollouts, right-padded; ``mask`` is 1 on
real response tokens (up to and including EOS) and 0 on padding. Everything padded is ignored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the positions where ``mask`` is 1 (all of them when ``dim`` is None)."""
    denom = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / denom.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked positions; Bessel-corrected by default (as in the usual PPO whitening)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise to unit variance over the masked positions (and zero mean unless ``shift_mean`` is False)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels) under ``logits`` ([B, T, V], [B, T] -> [B, T])."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the categorical distribution ([B, T, V] -> [B, T])."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy (Schulman's k1/k2/k3).

    k1 = log(p/q) (unbiased, can be negative), k2 = log(p/q)^2 / 2, k3 = q/p - 1 - log(q/p) (unbiased, >= 0).
    """
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl_estimator: must be k1, k2 or k3, got {estimator!r}")


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: ``-kl_coef * kl`` on every response token, plus the sequence score on its last one."""
    rewards = -kl_coef * kl * mask
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()  # the last real token per row
    return rewards + last.float() * scores.unsqueeze(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses; returns (advantages, returns).

    The value after the last real token is 0 (the episode ends with the response).
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        # On padding, carry nothing backwards: the next real step sees an episode end.
        running = running * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, averaged over real tokens; also the clip fraction and approx KL(old || new)."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clip_frac": masked_mean((clipped > unclipped).float(), mask),
                 "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_eps: float | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * max((v - R)^2, (clip(v, v_old +- eps) - R)^2); no clipping if eps is None."""
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        return 0.5 * masked_mean(unclipped, mask), {"vf_clip_frac": torch.zeros(())}
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"vf_clip_frac": masked_mean((clipped > unclipped).float(), mask)}
    return loss, stats


def grpo_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: each sample's score relative to its group (consecutive ``group_size`` samples of one prompt).

    (score - group mean) / (group std + eps), with the unbiased std; a group of equal scores gets 0.
    """
    if scores.numel() % group_size:
        raise ValueError(f"group_size: {scores.numel()} scores are not a multiple of group_size={group_size}")
    groups = scores.float().view(-1, group_size)
    std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
    return ((groups - groups.mean(dim=1, keepdim=True)) / (std + eps)).view(-1)


def has_eos(responses: torch.Tensor, mask: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per row: did the response end with EOS (False: it was cut at the length cap)? ([B, T] -> [B] bool)"""
    return ((responses == eos_id) & mask.bool()).any(-1)


def adjust_scores(scores: torch.Tensor, ended: torch.Tensor, *, missing_eos_penalty: float = 0.0,
                  whiten: bool = False, clip: float | None = None, eps: float = 1e-8) -> torch.Tensor:
    """Sequence scores as the policy is trained on them, in this order: whitened over the batch (zero mean,
    unit std: the KL penalty then weighs against a reward of fixed scale), clipped to ``[-clip, clip]``, and
    ``missing_eos_penalty`` subtracted from rows that did not end with EOS (``ended`` False), so running into
    the length cap costs the same whatever the reward scale."""
    out = scores.float()
    if whiten and out.numel() > 1:
        out = (out - out.mean()) / (out.std() + eps)
    if clip is not None:
        out = out.clamp(-clip, clip)
    return out - missing_eos_penalty * (~ended.bool()).float()


@dataclass
class KLController:
    """The KL coefficient: fixed (``target`` None), or adapted towards a target KL per response by proportional
    control (Ziegler et al. 2019; OpenRLHF's and TRL's ``AdaptiveKLController``).

    After each batch of ``n_steps`` samples whose mean KL per response was ``current_kl``:
    ``value *= 1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon``. Above the target the
    coefficient grows (the penalty bites harder), below it shrinks; ``horizon`` (in samples) sets the speed:
    the coefficient moves by at most 20% per ``horizon`` samples.

    ``min_value`` (ours; 0 = the standard controller) is a floor. Early in a run the policy is still close to the
    reference (KL 0 at the first iteration), so the standard controller keeps shrinking the coefficient and
    the KL later overshoots the target while it climbs back; in a run of tens of iterations that overshoot is
    most of the run. A floor at the starting coefficient keeps the penalty bounded below.
    """

    value: float
    target: float | None = None  # None: fixed coefficient
    horizon: int = 10000
    min_value: float = 0.0

    def update(self, current_kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value = max(self.value * (1.0 + error * n_steps / self.horizon), self.min_value)
        return self.value


DPOLossType = Literal["sigmoid", "ipo"]


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, *, loss_type: DPOLossType = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct preference optimization over [B] sequence log-probs (summed over each reply's tokens) of the
    policy and of the frozen reference, for B (chosen, rejected) pairs.

    With h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)):
    ``sigmoid`` (Rafailov et al. 2023): -log sigmoid(beta h); with ``label_smoothing`` e (conservative DPO,
    labels flipped with probability e): -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h).
    ``ipo`` (Azar et al. 2023): (h - 1 / (2 beta))^2, which stops pushing once the margin reaches its target.
    Stats: the implicit rewards beta * (log pi - log ref) of chosen and rejected replies, their margin, and the
    accuracy (share of pairs whose chosen reward is higher), all means over the batch.
    """
    wide = torch.promote_types(chosen_logps.dtype, torch.float32)  # fp32 at least: bf16 sums lose the margin
    chosen_ratio = chosen_logps.to(wide) - ref_chosen_logps.to(wide)
    rejected_ratio = rejected_logps.to(wide) - ref_rejected_logps.to(wide)
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = (-(1.0 - label_smoothing) * torch.nn.functional.logsigmoid(beta * h)
                  - label_smoothing * torch.nn.functional.logsigmoid(-beta * h))
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"loss_type: must be sigmoid or ipo, got {loss_type!r}")
    with torch.no_grad():
        chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
        stats = {"chosen_reward": chosen_rewards.mean(), "rejected_reward": rejected_rewards.mean(),
                 "margin": (chosen_rewards - rejected_rewards).mean(),
                 "accuracy": (chosen_rewards > rejected_rewards).float().mean()}
    return losses.mean(), stats
