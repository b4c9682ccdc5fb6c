"""GRPO's rewards and guards on audio built for them (flite speech, silence, loops, copies), scored by
the real offline judges."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.demo_corpus import synthesize
from s2train.judges.captioner import loudness_lufs
from s2train.judges.suite import JudgesConfig, JudgeSuite
from s2train.rl.rewards import (
    GuardConfig,
    RewardsConfig,
    Scoring,
    build_rewards,
    failed_guards,
    fill_not_applicable,
    normalise_loudness,
    repeat_share,
    score_candidates,
)
from s2train.rl.rollout import RolloutPrompt

TEXT = "Please put the green box on the table near the window."
OTHER = "My brother likes to cook rice and beans on Sunday evenings."


@pytest.fixture(scope="module")
def judges() -> JudgeSuite:
    return JudgeSuite(JudgesConfig())


@pytest.fixture(scope="module")
def speech() -> dict[str, np.ndarray]:
    return {
        "awb": synthesize("awb", TEXT, 16000),
        "awb_other": synthesize("awb", OTHER, 16000),
        "slt": synthesize("slt", TEXT, 16000),
        "slow": synthesize("awb", TEXT, 16000, 1.9),
        "fast": synthesize("awb", TEXT, 16000, 0.6),
    }


def _scoring(judges, wavs, prompts, c0=None, stopped=None) -> Scoring:
    rng = np.random.default_rng(0)
    return Scoring(
        judges,
        wavs,
        prompts,
        c0 if c0 is not None else [rng.integers(0, 256, 120) for _ in wavs],
        stopped if stopped is not None else [True] * len(wavs),
        GuardConfig().loudness_lufs,
    )


def test_loudness_normalisation_reaches_the_target_and_limits_peaks(speech):
    quiet = 0.01 * speech["awb"]
    out = normalise_loudness(quiet, -23.0)
    assert abs(loudness_lufs(out) - (-23.0)) < 0.5
    assert np.max(np.abs(normalise_loudness(speech["awb"], 0.0))) <= 10 ** (-1 / 20) + 1e-6
    assert np.array_equal(normalise_loudness(np.zeros(100, np.float32), -23.0), np.zeros(100, np.float32))


def test_wer_reward_prefers_the_right_words_and_floors_silence(judges, speech):
    prompts = [RolloutPrompt("a", TEXT), RolloutPrompt("b", TEXT), RolloutPrompt("c", TEXT)]
    wavs = [speech["awb"], speech["awb_other"], np.zeros(16000, np.float32)]
    score, raw = build_rewards(RewardsConfig(weights={"wer": 1.0}))["wer"](
        _scoring(judges, wavs, prompts), RewardsConfig()
    )
    assert score[0] >= 0.7 and score[1] <= 0.3 and score[0] > score[1]
    assert score[2] == 0.0 and raw[2] == 1.0  # no speech: the floor, not the WER of an empty transcript
    np.testing.assert_allclose(score, np.clip(1 - raw, 0, 1))


def test_sim_reward_prefers_the_reference_voice_and_saturates_at_its_cap(judges, speech):
    ref = speech["awb_other"]
    prompts = [
        RolloutPrompt("a", TEXT, reference_audio=ref),
        RolloutPrompt("b", TEXT, reference_audio=ref),
        RolloutPrompt("c", TEXT),
    ]
    wavs = [speech["awb"], speech["slt"], speech["awb"]]
    s = _scoring(judges, wavs, prompts)
    score, raw = build_rewards(RewardsConfig(weights={"sim": 1.0}))["sim"](s, RewardsConfig())
    assert raw[0] > raw[1] and score[0] > score[1] and np.isnan(score[2])
    capped, _ = build_rewards(RewardsConfig(weights={"sim": 1.0}))["sim"](s, RewardsConfig(sim_cap=0.3))
    assert capped[0] == 1.0  # above the cap there is nothing more to win


def test_instruction_reward_follows_the_captions_pace_and_the_texts_tags(judges, speech):
    slow_caption = "A male speaker speaks at a slow pace in a voice that is medium-pitched."
    prompts = [
        RolloutPrompt("a", TEXT, caption=slow_caption),
        RolloutPrompt("b", TEXT, caption=slow_caption),
        RolloutPrompt("c", TEXT),
    ]
    wavs = [speech["slow"], speech["fast"], speech["awb"]]
    score, _ = build_rewards(RewardsConfig(weights={"instruction": 1.0}))["instruction"](
        _scoring(judges, wavs, prompts), RewardsConfig()
    )
    assert score[0] > score[1] and np.isnan(score[2])  # the third asks for nothing
    paused = np.concatenate(
        [
            speech["awb"][: len(speech["awb"]) // 2],
            np.zeros(16000, np.float32),
            speech["awb"][len(speech["awb"]) // 2 :],
        ]
    )
    tagged = [
        RolloutPrompt("p", "Please put the green box [pause] on the table near the window.", tags=["[pause]"])
    ] * 2
    score, _ = build_rewards(RewardsConfig(weights={"instruction": 1.0}))["instruction"](
        _scoring(judges, [paused, speech["awb"]], tagged), RewardsConfig()
    )
    assert score[0] == 1.0 and score[1] == 0.0


def test_each_guard_fires_on_its_case_and_zeroes_every_reward(judges, speech):
    good = speech["awb"]
    prompts = [RolloutPrompt(str(i), TEXT, reference_audio=speech["awb_other"]) for i in range(7)]
    prompts[6] = RolloutPrompt("copy", TEXT, reference_audio=good)
    rng = np.random.default_rng(1)
    wavs = [
        good,  # 0: passes
        good[:4000],  # 1: a quarter second for twelve words: too short
        np.concatenate([good, np.zeros(16000 * 20, np.float32)]),  # 2: too long and mostly silent
        good,  # 3: never drew <|im_end|>
        np.concatenate([good, np.zeros(16000 * 6, np.float32)]),  # 4: silent for most of it
        good,  # 5: codebook 0 loops
        good,  # 6: the reference itself
    ]
    c0 = [rng.integers(0, 256, 150) for _ in wavs]
    c0[5] = np.tile(np.arange(6), 25)
    stopped = [True, True, True, False, True, True, True]
    s = _scoring(judges, wavs, prompts, c0, stopped)
    failed = failed_guards(s, GuardConfig(max_silence=0.6))
    assert failed[0] == []
    assert "duration" in failed[1] and "duration" in failed[2] and "silence" in failed[2]
    assert failed[3] == ["no_end"] and failed[4] == ["silence"] and failed[5] == ["repetition"]
    assert failed[6] == ["copy"]
    off = failed_guards(s, GuardConfig(enabled=[], max_silence=0.6))
    assert all(f == [] for f in off)
    scores = score_candidates(
        build_rewards(RewardsConfig(weights={"wer": 1.0, "sim": 1.0})),
        RewardsConfig(),
        GuardConfig(max_silence=0.6),
        s,
    )
    assert scores.components["wer"][0] > 0.5 and scores.components["sim"][0] > 0
    for i in range(1, 7):
        assert scores.components["wer"][i] == 0 and scores.components["sim"][i] == 0, i
    assert scores.raw["wer"][6] < 0.5  # the raw judge still heard the words: the guard decided


def test_repeat_share_and_not_applicable_scores():
    assert repeat_share([1, 2, 3, 4, 5, 6, 7]) == 0.0
    assert repeat_share([1, 2, 3, 4] * 5) == pytest.approx(13 / 17)
    filled = fill_not_applicable(np.array([[1.0, np.nan, 3.0], [np.nan, np.nan, np.nan]]))
    np.testing.assert_array_equal(filled, [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])


def test_reward_settings_are_checked():
    with pytest.raises(ValueError, match="unknown rewards"):
        RewardsConfig(weights={"bleu": 1.0})
    with pytest.raises(ValueError, match="preference_model"):
        build_rewards(RewardsConfig(weights={"preference": 1.0}))
    with pytest.raises(ValueError, match="unknown guards"):
        GuardConfig(enabled=["length"])


def test_a_guard_leaves_a_reward_that_does_not_apply_unset(judges, speech):
    prompts = [RolloutPrompt("a", TEXT), RolloutPrompt("b", TEXT)]  # no reference: sim does not apply
    s = _scoring(judges, [speech["awb"], speech["awb"]], prompts, stopped=[True, False])
    scores = score_candidates(
        build_rewards(RewardsConfig(weights={"wer": 1.0, "sim": 1.0})), RewardsConfig(), GuardConfig(), s
    )
    assert scores.guards == [[], ["no_end"]]
    assert scores.components["wer"][0] > 0.5 and scores.components["wer"][1] == 0.0
    assert np.isnan(scores.components["sim"]).all()  # not a 0 that would read as a failed voice
