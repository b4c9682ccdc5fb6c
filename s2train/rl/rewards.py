"""GRPO rewards: a registry of scorers, each mapping a candidate to [0, 1] and logging its raw value, and
the guards against reward hacking.

Every reward reads the candidates of one step together (``Scoring``: their audio at 16 kHz after
loudness normalisation, their prompts and codes, and the ASR transcripts and VAD regions, each computed
once on first use) and returns ``(score, raw)`` arrays:

- ``wer``: the ASR judge against the prompt's text after the official Seed-TTS-Eval text rules; score
  ``max(0, 1 - WER)``, raw the WER (a fraction); audio with under ``min_speech_s`` of speech scores 0
  with raw 1 (the floor: silence must not pass for a short sentence said well);
- ``sim``: cosine similarity of the speaker embeddings (``judges.speaker.backend``) of the candidate and
  the prompt's reference voice; score ``clip(sim, 0, sim_cap) / sim_cap`` (no gain above the cap); NaN
  without a reference;
- ``instruction``: adherence to the prompt's caption and tags, measured by the captioner: each attribute
  the caption names (pace, pitch, loudness, gender, whisper) scores 1 in the same bin, 0.5 in the next
  one, else 0; each tag type of the text scores 1 when the captioner finds it in the candidate; the score
  is their mean, NaN where the prompt asks for nothing;
- ``preference``: the learned preference model of ``stage=preference`` (``s2train.rl.preference``):
  the sigmoid of its score, raw the score;
- ``dnsmos``: DNSMOS OVRL, ``(ovrl - 1) / 4``, raw OVRL (the default held-out judge, and the
  ``preference`` alternative that needs no training).

A NaN score (a reward that does not apply to that prompt) counts as the group's mean, so it moves no
advantage.

**Guards** (``guards``: each can be switched off): a candidate that fails one gets every score that
applies to it set to 0, the minimum, whatever the judges thought of it, and the guard's name is logged:

- ``duration``: the audio's length against the text's syllables, outside
  ``[syllables / max_syllable_rate, syllables / min_syllable_rate + 1 s]``;
- ``no_end``: generation hit ``max_new_tokens`` without drawing ``<|im_end|>``;
- ``silence``: more than ``max_silence`` of the audio is not speech (VAD);
- ``repetition``: more than ``max_repeat`` of the codebook-0 4-grams already occurred earlier in the
  candidate (a loop);
- ``copy``: speaker similarity to the reference at least ``copy_sim``: the reference played back, not
  the text spoken.

Loudness normalisation (``loudness_lufs``) brings every candidate and reference to one integrated loudness (peaks
limited to -1 dBFS) before any judge hears it, so no reward can be won by getting louder or quieter.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from s2train.checks import check
from s2train.judges import JUDGE_RATE
from s2train.judges.captioner import bin_word, count_syllables, gender_from_pitch, loudness_lufs
from s2train.judges.suite import JudgeSuite
from s2train.rl.rollout import RolloutPrompt

REWARDS = ("wer", "sim", "instruction", "preference", "dnsmos")
GUARDS = ("duration", "no_end", "silence", "repetition", "copy")


@dataclass
class GuardConfig:
    """``grpo.guards``: what makes a candidate's every reward the minimum (module doc)."""

    enabled: list[str] = field(default_factory=lambda: list(GUARDS))
    min_syllable_rate: float = 1.0  # syllables per second: slower than this (+ 1 s) is too long
    max_syllable_rate: float = 9.0  # faster than this is too short
    max_silence: float = 0.7  # share of the audio without speech
    max_repeat: float = 0.5  # share of codebook-0 4-grams seen before in the same candidate
    copy_sim: float = 0.97  # speaker similarity to the reference at which a candidate is its copy
    loudness_lufs: float | None = -23.0  # normalise every candidate to this before scoring; null: off

    def __post_init__(self) -> None:
        unknown = [g for g in self.enabled if g not in GUARDS]
        check(
            not unknown,
            f"grpo.guards.enabled has unknown guards {unknown}; the guards are {', '.join(GUARDS)}",
        )
        check(
            0 < self.min_syllable_rate < self.max_syllable_rate,
            "grpo.guards needs 0 < min_syllable_rate < max_syllable_rate",
        )
        check(0 < self.max_silence <= 1, f"grpo.guards.max_silence must be in (0, 1], not {self.max_silence}")
        check(0 < self.max_repeat <= 1, f"grpo.guards.max_repeat must be in (0, 1], not {self.max_repeat}")


@dataclass
class RewardsConfig:
    """``grpo.rewards``: the weight of each reward (module doc) and their settings."""

    weights: dict[str, float] = field(default_factory=lambda: {"wer": 1.0, "sim": 0.5, "instruction": 0.5})
    sim_cap: float = 0.9  # the speaker score saturates at this similarity
    min_speech_s: float = 0.2  # less speech than this: WER 1
    preference_model: str | None = None  # a stage=preference run dir (or its preference.safetensors)
    dnsmos_hop_s: float = 1.0

    def __post_init__(self) -> None:
        unknown = [name for name in self.weights if name not in REWARDS]
        check(
            not unknown,
            f"grpo.rewards.weights has unknown rewards {unknown}; the rewards are {', '.join(REWARDS)}",
        )
        check(
            all(w >= 0 for w in self.weights.values()) and sum(self.weights.values()) > 0,
            f"grpo.rewards.weights must be >= 0 and not all 0, not {self.weights}",
        )
        check(0 < self.sim_cap <= 1, f"grpo.rewards.sim_cap must be in (0, 1], not {self.sim_cap}")


def normalise_loudness(wav: np.ndarray, target_lufs: float) -> np.ndarray:
    """``wav`` at ``target_lufs`` integrated loudness, peaks limited to -1 dBFS; too short or silent audio
    (no measurable loudness) is returned as it is."""
    lufs = loudness_lufs(wav)
    if lufs is None:
        return wav
    out = wav * 10 ** ((target_lufs - lufs) / 20)
    peak = float(np.max(np.abs(out))) if len(out) else 0.0
    limit = 10 ** (-1 / 20)
    return (out * (limit / peak) if peak > limit else out).astype(np.float32)


def repeat_share(c0: Sequence[int], n: int = 4) -> float:
    """The share of the n-grams of ``c0`` that occurred earlier in it (0 for fewer than n + 1 tokens)."""
    grams = [tuple(c0[i : i + n]) for i in range(len(c0) - n + 1)]
    if len(grams) < 2:
        return 0.0
    seen, repeated = set(), 0
    for g in grams:
        repeated += g in seen
        seen.add(g)
    return repeated / len(grams)


@dataclass
class Scoring:
    """The candidates of a step as the rewards see them; ASR, VAD and speaker embeddings on first use."""

    judges: JudgeSuite
    wavs: list[np.ndarray]  # 16 kHz
    prompts: list[RolloutPrompt]  # the prompt of each candidate
    c0: list[np.ndarray]  # codebook 0 of each candidate's frames
    stopped: list[bool]
    loudness_lufs: float | None = None  # the candidates (given at their own level) and references are
    # brought to this loudness before any judge hears them (``guards.loudness_lufs``); None: as given

    def __post_init__(self) -> None:
        self.wavs = [self.level(w) for w in self.wavs]

    def level(self, wav: np.ndarray) -> np.ndarray:
        wav = np.asarray(wav, dtype=np.float32)
        return wav if self.loudness_lufs is None else normalise_loudness(wav, self.loudness_lufs)

    @cached_property
    def transcripts(self):
        return self.judges.asr(self.wavs, [p.lang for p in self.prompts])

    @cached_property
    def regions(self) -> list[list[tuple[float, float]]]:
        return self.judges.vad(self.wavs)

    def speech_s(self, i: int) -> float:
        return float(sum(b - a for a, b in self.regions[i]))

    @cached_property
    def similarity(self) -> np.ndarray:
        """Cosine similarity of each candidate to its prompt's reference voice (NaN without one)."""
        sims = np.full(len(self.wavs), np.nan)
        pairs = [
            (i, p.reference_audio)
            for i, p in enumerate(self.prompts)
            if p.reference_audio is not None and len(self.wavs[i]) >= JUDGE_RATE // 4
        ]
        embed = self.judges.embedder.embed  # one clip a call: a batch is cut to its shortest clip
        references: dict[int, np.ndarray] = {}
        for i, ref in pairs:
            if id(ref) not in references:  # the reference heard as the candidates are (the same loudness)
                references[id(ref)] = embed([self.level(ref)])[0]
            a, b = embed([self.wavs[i]])[0], references[id(ref)]
            sims[i] = float(np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-9))
        return sims


# ------------------------------------------------------------------------------------------ rewards


def wer_reward(s: Scoring, cfg: RewardsConfig) -> tuple[np.ndarray, np.ndarray]:
    from eval.seedtts import PROFILES, score_utterance

    raw = np.ones(len(s.wavs))
    for i, (prompt, transcript) in enumerate(zip(s.prompts, s.transcripts)):
        if s.speech_s(i) >= cfg.min_speech_s:
            lang = prompt.lang if prompt.lang in ("en", "zh") else "en"
            plain = re.sub(r"\[[^\]]*\]|<\|[^|]*\|>", " ", prompt.text)  # tags and speaker tokens: not words
            raw[i] = score_utterance(prompt.key, plain, transcript.text, lang, PROFILES["official"]).wer
    return np.clip(1.0 - raw, 0.0, 1.0), raw


def sim_reward(s: Scoring, cfg: RewardsConfig) -> tuple[np.ndarray, np.ndarray]:
    raw = s.similarity
    return np.clip(raw, 0.0, cfg.sim_cap) / cfg.sim_cap, raw


_PACE = {"slow": 0, "moderate": 1, "fast": 2}
_PITCH = {"low-pitched": 0, "medium-pitched": 1, "high-pitched": 2}
_LOUDNESS = {"quiet": 0, "loud": 2}


def _bin_match(wanted: int, got: int | None) -> float:
    if got is None:
        return 0.0
    return {0: 1.0, 1: 0.5}.get(abs(wanted - got), 0.0)


def instruction_reward(s: Scoring, cfg: RewardsConfig) -> tuple[np.ndarray, np.ndarray]:
    captioner = s.judges.captioner
    bins = captioner.bins
    scores = np.full(len(s.wavs), np.nan)
    for i, prompt in enumerate(s.prompts):
        caption = (prompt.caption or "").lower()
        if not caption and not prompt.tags:
            continue
        wav, speech = s.wavs[i], s.speech_s(i)
        plain = re.sub(r"\[[^\]]*\]", " ", prompt.text)
        m = captioner.measure(wav, plain, speech)
        parts: list[float] = []
        for table, key, spec in (
            (_PACE, "speaking_rate", bins["speaking_rate"]),
            (_PITCH, "pitch_hz", bins["pitch_hz"]),
        ):
            asked = [w for w in table if re.search(rf"\b{w}\b", caption)]
            if asked:
                got = bin_word(m.get(key), spec)
                parts.append(_bin_match(table[asked[0]], table.get(got)))
        asked = [w for w in _LOUDNESS if re.search(rf"\b{w}\b", caption)]
        if asked:
            got = bin_word(m.get("loudness_lufs"), bins["loudness_lufs"])
            parts.append(float(got == asked[0]))
        gender = "female" if "female" in caption else "male" if re.search(r"\bmale\b", caption) else None
        if gender:
            parts.append(float(gender_from_pitch(m.get("pitch_hz"), bins["gender"]) == gender))
        if "whisper" in caption:
            parts.append(float(bin_word(m.get("voiced_ratio"), bins["voiced_ratio"]) == "whispery"))
        if prompt.tags:
            found = {t["tag"] for t in _tags_of(s, i, plain)}
            parts.extend(float(tag in found) for tag in sorted(set(prompt.tags)))
        scores[i] = float(np.mean(parts)) if parts else np.nan
    return scores, scores.copy()


def _tags_of(s: Scoring, i: int, text: str) -> list[dict]:
    """The captioner's inline tags of candidate ``i``, placed by the ASR's words and the VAD's pauses."""
    regions = s.regions[i]
    pauses = [(a[1], b[0]) for a, b in zip(regions, regions[1:])]
    words = s.transcripts[i].words or []
    out = s.judges.captioner(f"grpo-{i}", s.wavs[i], text, words, pauses, s.speech_s(i), {})
    return out["tags"]


def dnsmos_reward(s: Scoring, cfg: RewardsConfig) -> tuple[np.ndarray, np.ndarray]:
    raw = np.array(
        [s.judges.dnsmos(w, cfg.dnsmos_hop_s)["ovrl"] if len(w) >= JUDGE_RATE else 1.0 for w in s.wavs]
    )
    return np.clip((raw - 1.0) / 4.0, 0.0, 1.0), raw


class PreferenceReward:
    """The learned preference model's sigmoid score (``stage=preference``), loaded once."""

    def __init__(self, cfg: RewardsConfig):
        from s2train.rl.preference import PreferenceScorer

        if not cfg.preference_model:
            raise ValueError(
                "the preference reward needs grpo.rewards.preference_model: a stage=preference run "
                "(python -m s2train stage=preference ...) or its preference.safetensors"
            )
        self.scorer = PreferenceScorer.open(cfg.preference_model)

    def __call__(self, s: Scoring, cfg: RewardsConfig) -> tuple[np.ndarray, np.ndarray]:
        raw = self.scorer.score(s.wavs, JUDGE_RATE)
        return 1.0 / (1.0 + np.exp(-raw)), raw


def build_rewards(cfg: RewardsConfig, names: Sequence[str] | None = None) -> dict[str, Callable]:
    """``name -> reward(scoring, cfg) -> (score, raw)`` for ``names`` (default: those of positive weight)."""
    table: dict[str, Callable] = {
        "wer": wer_reward,
        "sim": sim_reward,
        "instruction": instruction_reward,
        "dnsmos": dnsmos_reward,
    }
    out = {}
    for name in names if names is not None else [k for k, w in cfg.weights.items() if w > 0]:
        if name == "preference":
            out[name] = PreferenceReward(cfg)
        elif name in table:
            out[name] = table[name]
        else:
            raise ValueError(f"unknown reward {name!r}; the rewards are {', '.join(REWARDS)}")
    return out


# ------------------------------------------------------------------------------------------- guards


def failed_guards(s: Scoring, cfg: GuardConfig) -> list[list[str]]:
    """For every candidate, the guards it fails (module doc)."""
    on = set(cfg.enabled)
    out = []
    for i, (wav, prompt) in enumerate(zip(s.wavs, s.prompts)):
        failed = []
        seconds = len(wav) / JUDGE_RATE
        if "duration" in on:
            syllables = max(1, count_syllables(re.sub(r"\[[^\]]*\]|<\|[^|]*\|>", " ", prompt.text)))
            if not syllables / cfg.max_syllable_rate <= seconds <= syllables / cfg.min_syllable_rate + 1.0:
                failed.append("duration")
        if "no_end" in on and not s.stopped[i]:
            failed.append("no_end")
        if "silence" in on and (seconds == 0 or 1 - s.speech_s(i) / seconds > cfg.max_silence):
            failed.append("silence")
        if "repetition" in on and repeat_share(list(s.c0[i])) > cfg.max_repeat:
            failed.append("repetition")
        if "copy" in on and prompt.reference_audio is not None:
            sim = s.similarity[i]
            if not math.isnan(sim) and sim >= cfg.copy_sim:
                failed.append("copy")
        out.append(failed)
    return out


@dataclass
class Scores:
    """One step's scores: ``components`` name -> (B,) in [0, 1] after guards (NaN: not applicable),
    ``raw`` name -> (B,) as the judge gave it, ``guards`` the failed guards of each candidate."""

    components: dict[str, np.ndarray]
    raw: dict[str, np.ndarray]
    guards: list[list[str]]


def score_candidates(
    rewards: dict[str, Callable], cfg: RewardsConfig, guards: GuardConfig, scoring: Scoring
) -> Scores:
    components, raw = {}, {}
    for name, reward in rewards.items():
        components[name], raw[name] = (np.asarray(x, dtype=np.float64) for x in reward(scoring, cfg))
    failed = failed_guards(scoring, guards)
    for i, names in enumerate(failed):
        if names:
            for values in components.values():
                if not np.isnan(
                    values[i]
                ):  # a reward that does not apply stays so (logged means stay honest)
                    values[i] = 0.0
    return Scores(components, raw, failed)


def fill_not_applicable(values_PG: np.ndarray) -> np.ndarray:
    """NaN scores replaced by their group's mean (0 where the whole group is NaN): they move no advantage."""
    out = values_PG.copy()
    for row in out:
        missing = np.isnan(row)
        if missing.any():
            row[missing] = np.nanmean(row) if (~missing).any() else 0.0
    return out
