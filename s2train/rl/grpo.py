"""The GRPO objective for a Dual-AR policy: pure functions of rewards and log-probabilities.

Shape legend: P prompts, G candidates a prompt (the group), B = P * G sequences, M tokens of a batch
(slow and fast together, flattened), K codebooks.

A Dual-AR candidate is two token streams: the slow tokens (one a frame, and the ending ``<|im_end|>``)
and the fast model's residual codes c1 .. c_{K-1} of every frame (c0 follows from the slow token, so it
is not a draw of the policy). Both are actions; every token of a candidate carries the candidate's
advantage, and the loss is a token-level mean over both streams with the fast tokens weighted by
``fast_weight`` (a frame has K - 1 fast tokens and one slow token: weight 1 lets the fast stream outvote
the slow one K - 1 to 1, which is rarely what one wants for the words; the default weighs the fast
tokens of a frame together as much as its slow token).

**Advantages** (``group_advantages``): within each group, ``(r - mean) / max(std, std_floor)`` with the
unbiased standard deviation, so a group whose candidates all scored the same gets advantage 0 (nothing
to learn from it) instead of a division by zero. ``combine_rewards`` is the weighted mean of the rewards
(in [0, 1] when they are); with ``normalise_each`` every reward is group-normalised first, so a reward
with a wide raw spread does not drown the others.

**Loss per token** (``clipped_surrogate``), with ``ratio = exp(logp - old_logp)`` and advantage ``A``::

    -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)

plus ``kl_coef`` times the k3 estimate of KL(policy || reference) (``k3``), ``exp(ref - logp) - (ref -
logp) - 1``, which is never negative and unbiased for the KL under samples of the policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from s2train.checks import check


@dataclass
class ObjectiveConfig:
    """``grpo.objective``: how rewards become advantages and how the policy is moved."""

    std_floor: float = 1e-4  # a group's reward std below this counts as this (all-equal groups: A = 0)
    normalise_each: bool = False  # group-normalise every reward before the weighted sum
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.28  # a wider upper range lets unlikely good tokens grow (DAPO's clip-higher)
    fast_weight: float | None = None  # weight of a fast token against a slow one; None: 1 / (K - 1)
    kl_coef: float = 0.02  # k3 KL to the frozen starting model; > 0: learned rewards can be gamed

    def __post_init__(self) -> None:
        check(self.std_floor > 0, f"grpo.objective.std_floor must be positive, not {self.std_floor}")
        check(
            0 <= self.clip_low < 1 and self.clip_high >= 0,
            f"grpo.objective.clip_low must be in [0, 1) and clip_high >= 0, not {self.clip_low}, {self.clip_high}",
        )
        check(
            self.fast_weight is None or self.fast_weight >= 0,
            f"grpo.objective.fast_weight must be >= 0 (or null), not {self.fast_weight}",
        )
        check(self.kl_coef >= 0, f"grpo.objective.kl_coef cannot be negative, not {self.kl_coef}")


def group_advantages(rewards_PG: Tensor, std_floor: float = 1e-4) -> Tensor:
    """(P, G) rewards -> (P, G) advantages: each group centred and divided by its (unbiased) std, floored."""
    if rewards_PG.dim() != 2 or rewards_PG.shape[1] < 2:
        raise ValueError(
            f"rewards must be (prompts, candidates) with at least 2 candidates, not {tuple(rewards_PG.shape)}"
        )
    mean = rewards_PG.mean(dim=1, keepdim=True)
    std = rewards_PG.std(dim=1, keepdim=True).clamp_min(std_floor)
    return (rewards_PG - mean) / std


def combine_rewards(
    components: Mapping[str, Tensor],
    weights: Mapping[str, float],
    *,
    normalise_each: bool = False,
    std_floor: float = 1e-4,
) -> Tensor:
    """The weighted mean of (P, G) reward components (each group-normalised first with ``normalise_each``)."""
    missing = [name for name in weights if name not in components]
    if missing:
        raise ValueError(f"no values for the rewards {missing}")
    total = None
    for name, weight in weights.items():
        values = components[name].to(torch.float64)
        if normalise_each:
            values = group_advantages(values, std_floor)
        total = weight * values if total is None else total + weight * values
    if total is None or sum(weights.values()) <= 0:
        raise ValueError("grpo.rewards is empty: name at least one reward with a positive weight")
    return total / sum(weights.values())


def k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """The k3 estimator of KL(policy || reference) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    diff = ref_logp - logp
    return torch.expm1(diff) - diff  # expm1: exp(d) - 1 - d keeps its precision for small d


def clipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantage: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor]:
    """Per-token loss ``-min(ratio A, clip(ratio) A)`` and whether the clipped term was the one taken."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantage
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantage
    return -torch.minimum(unclipped, clipped), clipped < unclipped


@dataclass
class TokenBatch:
    """Every trained token of a batch of candidates, flattened (slow tokens first, then fast ones)."""

    logp: Tensor  # (M,) under the policy being trained (with a graph)
    old_logp: Tensor  # (M,) under the policy that drew them (the rollout's)
    ref_logp: Tensor | None  # (M,) under the frozen starting model; None: no KL term
    advantage: Tensor  # (M,) the candidate's advantage
    weight: Tensor  # (M,) 1 for a slow token, fast_weight for a fast one
    fast: Tensor  # bool (M,): a fast token


def grpo_loss(tokens: TokenBatch, cfg: ObjectiveConfig) -> dict[str, Tensor]:
    """The token-level weighted mean of the clipped surrogate plus ``kl_coef`` times k3, and what to log:
    ``loss/total``, ``loss/policy``, ``kl`` (weighted mean k3), ``clip_fraction`` (share of the weight
    whose clipped term was taken), ``ratio_mean``."""
    w = tokens.weight
    total_w = w.sum().clamp_min(1e-12)
    surrogate, clipped = clipped_surrogate(
        tokens.logp, tokens.old_logp, tokens.advantage, cfg.clip_low, cfg.clip_high
    )
    policy = (surrogate * w).sum() / total_w
    out = {"loss/policy": policy}
    loss = policy
    if tokens.ref_logp is not None:
        kl = (k3(tokens.logp, tokens.ref_logp) * w).sum() / total_w
        loss = loss + cfg.kl_coef * kl
        out["kl"] = kl.detach()
    out["loss/total"] = loss
    with torch.no_grad():
        out["clip_fraction"] = (clipped.to(w.dtype) * w).sum() / total_w
        out["ratio_mean"] = (torch.exp(tokens.logp - tokens.old_logp) * w).sum() / total_w
    return out
