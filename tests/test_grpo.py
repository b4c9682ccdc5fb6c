"""GRPO's objective by hand-computed examples, and rollouts: the engine's log-probabilities equal the
trainer's forward, and a few updates towards a preferred candidate make it likelier."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from s2train.inference.engine import InferenceEngine
from s2train.inference.sampling import SamplingParams
from s2train.models.dual_ar import DualAR, tiny
from s2train.rl.grpo import (
    ObjectiveConfig,
    TokenBatch,
    clipped_surrogate,
    combine_rewards,
    group_advantages,
    grpo_loss,
    k3,
)
from s2train.rl.rollout import (
    RolloutPrompt,
    candidate_batch,
    candidate_seed,
    draw_groups,
    rollout_logprobs,
    token_logprobs,
)
from s2train.text.prompt import Reference
from s2train.text.tokenizer import ByteTokenizer
from tests.test_engine import one_thread  # noqa: F401  (autouse: decode the tiny model on one thread)

IM_END = 258  # ByteTokenizer(4, 64)


@pytest.fixture(scope="module")
def tokenizer() -> ByteTokenizer:
    return ByteTokenizer(4, 64)


def _model(seed: int = 0) -> DualAR:
    torch.manual_seed(seed)
    return DualAR(tiny()).eval()


def _voice(seed: int, frames: int = 10) -> Reference:
    g = torch.Generator().manual_seed(seed)
    codes = torch.cat(
        [torch.randint(0, 64, (1, frames), generator=g), torch.randint(0, 32, (3, frames), generator=g)]
    )
    return Reference(f"Voice {seed}.", codes)


# ---------------------------------------------------------------------------------------- objective


def test_group_advantages_centre_and_scale_each_group_and_floor_a_flat_one():
    adv = group_advantages(torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [0.0, 0.0, 4.0]]), std_floor=1e-4)
    # group 1: mean 2, unbiased std 1; group 2: std 0 -> floored, all 0; group 3: mean 4/3, std 4/sqrt(3)
    torch.testing.assert_close(adv[0], torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(adv[1], torch.zeros(3))
    s = 4 / math.sqrt(3)
    torch.testing.assert_close(adv[2], torch.tensor([-4 / 3 / s, -4 / 3 / s, 8 / 3 / s]))
    with pytest.raises(ValueError, match="at least 2 candidates"):
        group_advantages(torch.ones(3, 1))


def test_combined_rewards_weight_raw_or_group_normalised_parts():
    parts = {"wer": torch.tensor([[0.0, 1.0]]), "sim": torch.tensor([[10.0, 30.0]])}
    torch.testing.assert_close(
        combine_rewards(parts, {"wer": 1.0, "sim": 0.5}),
        torch.tensor([[5.0 / 1.5, 16.0 / 1.5]], dtype=torch.float64),
    )
    # normalised first: each part is -0.7071, +0.7071 (unbiased std of two values), then (a + 0.5 b) / 1.5
    z = 1 / math.sqrt(2)
    torch.testing.assert_close(
        combine_rewards(parts, {"wer": 1.0, "sim": 0.5}, normalise_each=True),
        torch.tensor([[-z, z]], dtype=torch.float64),
    )
    with pytest.raises(ValueError, match="no values for the rewards"):
        combine_rewards(parts, {"dnsmos": 1.0})


def test_clipped_surrogate_takes_the_pessimistic_term_on_either_side():
    old = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5]))
    new = torch.log(torch.tensor([0.8, 0.8, 0.2, 0.2]))  # ratios 1.6, 1.6, 0.4, 0.4
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipped = clipped_surrogate(new, old, adv, clip_low=0.2, clip_high=0.28)
    # A > 0, ratio 1.6: min(1.6, 1.28) = 1.28; A < 0, ratio 1.6: min(-1.6, -1.28) = -1.6 (unclipped);
    # A > 0, ratio 0.4: min(0.4, 0.8) = 0.4 (unclipped); A < 0, ratio 0.4: min(-0.4, -0.8) = -0.8
    torch.testing.assert_close(loss, torch.tensor([-1.28, 1.6, -0.4, 0.8]))
    assert clipped.tolist() == [True, False, False, True]


def test_k3_is_zero_on_agreement_and_matches_its_formula():
    logp = torch.log(torch.tensor([0.5, 0.25]))
    ref = torch.log(torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(k3(logp, ref), torch.tensor([0.0, 2.0 - math.log(2.0) - 1.0]))
    assert (k3(torch.randn(100), torch.randn(100)) >= 0).all()


def test_grpo_loss_is_the_weighted_token_mean_plus_the_kl_term():
    logp = torch.log(torch.tensor([0.6, 0.3, 0.3]))
    old = torch.log(torch.tensor([0.5, 0.3, 0.2]))  # ratios 1.2, 1.0, 1.5
    ref = torch.log(torch.tensor([0.6, 0.6, 0.3]))
    tokens = TokenBatch(
        logp=logp,
        old_logp=old,
        ref_logp=ref,
        advantage=torch.tensor([1.0, 1.0, -2.0]),
        weight=torch.tensor([1.0, 0.5, 0.5]),  # a slow token, two fast ones at half weight
        fast=torch.tensor([False, True, True]),
    )
    cfg = ObjectiveConfig(clip_low=0.2, clip_high=0.28, kl_coef=0.1)
    out = grpo_loss(tokens, cfg)
    # surrogates: -min(1.2, 1.2) = -1.2; -1.0; -min(-3.0, -2.56) = 3.0; weighted mean over weight 2
    policy = (-1.2 * 1.0 - 1.0 * 0.5 + 3.0 * 0.5) / 2.0
    kl = (0.0 * 1.0 + (2.0 - math.log(2.0) - 1.0) * 0.5 + 0.0 * 0.5) / 2.0
    torch.testing.assert_close(out["loss/policy"], torch.tensor(policy))
    torch.testing.assert_close(out["kl"], torch.tensor(kl))
    torch.testing.assert_close(out["loss/total"], torch.tensor(policy + 0.1 * kl))
    torch.testing.assert_close(out["clip_fraction"], torch.tensor(0.0))  # 1.5 > 1.28 but A < 0: unclipped


def test_objective_settings_are_checked():
    with pytest.raises(ValueError, match="std_floor"):
        ObjectiveConfig(std_floor=0)
    with pytest.raises(ValueError, match="clip_low"):
        ObjectiveConfig(clip_low=1.0)
    with pytest.raises(ValueError, match="kl_coef"):
        ObjectiveConfig(kl_coef=-1)


# ----------------------------------------------------------------------------------------- rollouts


def _prompts() -> list[RolloutPrompt]:
    return [
        RolloutPrompt("a", "One two three."),
        RolloutPrompt("b", "Four five.", references=[_voice(1)]),
        RolloutPrompt("c", "Six.", caption="A slow, low-pitched voice."),
    ]


@torch.no_grad()
def test_rollout_log_probs_equal_the_trainers_forward_on_both_streams(tokenizer):
    model = _model()
    engine = InferenceEngine(model, IM_END, max_batch=4)
    sampling = SamplingParams.exact_at(1.2, 0.9)
    candidates = draw_groups(
        engine, tokenizer, _prompts(), group_size=3, sampling=sampling, max_new_tokens=30, seed=5, step=2
    )
    assert [(c.prompt_index, c.candidate) for c in candidates] == [(p, g) for p in range(3) for g in range(3)]
    stopped = [c.generation.stopped for c in candidates]
    assert any(stopped) and not all(stopped)  # both endings are in the comparison
    old = rollout_logprobs(candidates)
    now = token_logprobs(model, candidate_batch(candidates, tokenizer), IM_END, 1.2, 0.9)
    assert now.slow.shape == old.slow.shape and now.fast.shape == old.fast.shape
    assert torch.equal(now.slow_owner, old.slow_owner) and torch.equal(now.fast_owner, old.fast_owner)
    torch.testing.assert_close(now.slow, old.slow, atol=1e-5, rtol=0)
    torch.testing.assert_close(now.fast, old.fast, atol=1e-5, rtol=0)
    assert math.isfinite(now.slow_entropy) and now.slow_entropy > 0 and now.fast_entropy > 0
    # the seeds are per candidate: a resumed step draws the same candidates
    again = draw_groups(
        engine, tokenizer, _prompts(), group_size=3, sampling=sampling, max_new_tokens=30, seed=5, step=2
    )
    assert all(torch.equal(a.generation.tokens, b.generation.tokens) for a, b in zip(candidates, again))
    assert len({candidate_seed(5, 2, p, g) for p in range(3) for g in range(3)}) == 9


def test_rollouts_refuse_sampling_without_log_probs(tokenizer):
    engine = InferenceEngine(_model(), IM_END, max_batch=2)
    with pytest.raises(ValueError, match="exact mode"):
        draw_groups(
            engine,
            tokenizer,
            _prompts(),
            group_size=2,
            sampling=SamplingParams(),
            max_new_tokens=5,
            seed=0,
            step=0,
        )


def test_updates_towards_a_preferred_candidate_make_it_likelier(tokenizer):
    """One prompt, four candidates, a reward that prefers the first: a few GRPO updates (the rollout
    drawn once, as with several epochs over one batch) raise its log-probability and lower the others'."""
    model = _model(3)
    sampling = SamplingParams.exact_at(1.0)
    prompt = RolloutPrompt("a", "Hello there.")
    candidates = draw_groups(
        InferenceEngine(model, IM_END, max_batch=4),
        tokenizer,
        [prompt],
        group_size=4,
        sampling=sampling,
        max_new_tokens=12,
        seed=1,
        step=0,
    )
    batch = candidate_batch(candidates, tokenizer)
    old = rollout_logprobs(candidates)
    advantages = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))[0]

    def per_candidate(lp) -> torch.Tensor:
        total = torch.zeros(4).index_add(0, lp.slow_owner, lp.slow)
        return total.index_add(0, lp.fast_owner, lp.fast.sum(dim=1))

    before = per_candidate(old)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    cfg = ObjectiveConfig(kl_coef=0.0, clip_high=10.0, clip_low=0.9)
    for _ in range(5):
        now = token_logprobs(model, batch, IM_END, 1.0, 1.0)
        owners = torch.cat([now.slow_owner, now.fast_owner.repeat_interleave(now.fast.shape[1])])
        fast = torch.cat(
            [torch.zeros(len(now.slow), dtype=torch.bool), torch.ones(now.fast.numel(), dtype=torch.bool)]
        )
        tokens = TokenBatch(now.flat(), old.flat(), None, advantages[owners], torch.ones(len(owners)), fast)
        optimizer.zero_grad()
        grpo_loss(tokens, cfg)["loss/total"].backward()
        optimizer.step()
    with torch.no_grad():
        after = per_candidate(token_logprobs(model.eval(), batch, IM_END, 1.0, 1.0))
    assert after[0] > before[0] + 1.0, (before, after)
    assert (after[1:] < before[1:]).all(), (before, after)


def test_heldout_totals_are_the_rewards_themselves_when_training_normalises_each():
    from types import SimpleNamespace

    from s2train.rl.grpo_stage import GRPOConfig, GRPOModule

    g = GRPOConfig()
    g.objective.normalise_each = True
    g.rewards.weights = {"dnsmos": 1.0, "sim": 0.5}
    module = SimpleNamespace(g=g)
    scores = SimpleNamespace(components={"dnsmos": np.array([0.2, 0.4, 0.6, 0.8]), "sim": np.ones(4)})
    trained, _ = GRPOModule.totals(module, scores, 2, 2)  # each prompt's pair centred: totals sum to 0
    assert trained.sum(dim=1).abs().max() < 1e-9
    heldout, _ = GRPOModule.totals(module, scores, 2, 2, normalise_each=False)
    expected = (np.array([[0.2, 0.4], [0.6, 0.8]]) + 0.5) / 1.5
    assert torch.allclose(heldout, torch.from_numpy(expected))
