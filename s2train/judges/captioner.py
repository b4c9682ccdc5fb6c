"""A rule-based, offline speech captioner: measurements -> binned words -> a caption and inline tags.

Measurements: pitch (median and spread in semitones, from librosa's pYIN), voiced ratio, speaking rate
(syllables per second of speech), loudness (LUFS, pyloudnorm), SNR and bandwidth (from the quality
judge) and the pauses inside the segment. A versioned bin-edge file (``caption_bins/v1.json``) turns
them into words; gender is guessed from pitch with an explicit unknown band. The caption is written
from varied templates (picked by a hash of the segment id, so reruns agree) and ``[pause]`` tags mark
the long gaps between words. A learned captioner fills the same fields later.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from s2train.judges import JUDGE_RATE
from s2train.judges.asr import Word


@dataclass
class CaptionerConfig:
    bins: str = "v1"  # s2train/judges/caption_bins/<bins>.json, or a path to such a file


BINS_DIR = Path(__file__).parent / "caption_bins"


def load_bins(name: str) -> dict:
    path = Path(name) if name.endswith(".json") else BINS_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in BINS_DIR.glob("*.json"))
        raise ValueError(f"caption bins {name!r} not found; shipped versions: {known}, or give a .json path")
    return json.loads(path.read_text())


def bin_word(value: float | None, spec: dict) -> str:
    """The word of the bin ``value`` falls in (edges are lower-inclusive upper bounds)."""
    if value is None or not np.isfinite(value):
        return ""
    return spec["words"][int(np.searchsorted(spec["edges"], value, side="right"))]


def gender_from_pitch(pitch_hz: float | None, spec: dict) -> str:
    if pitch_hz is None or not np.isfinite(pitch_hz):
        return "unknown"
    if pitch_hz < spec["male_below_hz"]:
        return "male"
    if pitch_hz > spec["female_above_hz"]:
        return "female"
    return "unknown"


def count_syllables(text: str) -> int:
    """Characters for Chinese/Japanese, vowel groups per word elsewhere (at least one a word)."""
    cjk = re.findall(r"[\u3040-\u30ff\u3400-\u9fff]", text)
    words = re.findall(r"[^\W\d_]+", re.sub(r"[\u3040-\u30ff\u3400-\u9fff]", " ", text.lower()))
    return len(cjk) + sum(max(1, len(re.findall(r"[aeiouyàáâãäåèéêëìíîïòóôõöùúûüý]+", w))) for w in words)


def pitch_stats(wav: np.ndarray) -> tuple[float | None, float | None, float]:
    """``(median f0 Hz, f0 spread in semitones, voiced ratio)`` from pYIN."""
    import librosa

    if len(wav) < 2048:
        return None, None, 0.0
    f0, voiced, _ = librosa.pyin(
        wav.astype(np.float32), fmin=60.0, fmax=500.0, sr=JUDGE_RATE, frame_length=1024, hop_length=320
    )
    f0 = f0[voiced & np.isfinite(f0)]
    ratio = float(np.mean(voiced)) if len(voiced) else 0.0
    if len(f0) < 5:
        return None, None, ratio
    semitones = 12 * np.log2(f0 / np.median(f0))
    return float(np.median(f0)), float(np.std(semitones)), ratio


def loudness_lufs(wav: np.ndarray) -> float | None:
    import pyloudnorm

    if len(wav) < int(0.4 * JUDGE_RATE):
        return None
    value = pyloudnorm.Meter(JUDGE_RATE).integrated_loudness(wav.astype(np.float64))
    return float(value) if np.isfinite(value) else None


def tagged_text(words: list[str], tags: list[dict]) -> str:
    """The transcript with inline tags placed after the word they follow."""
    after: dict[int, list[str]] = {}
    for tag in tags:
        if tag.get("word_index") is not None:
            after.setdefault(tag["word_index"], []).append(tag["tag"])
    out = list(after.get(0, []))
    for i, word in enumerate(words, start=1):
        out.append(word)
        out.extend(after.get(i, []))
    return " ".join(out)


class RuleCaptioner:
    def __init__(self, cfg: CaptionerConfig, seed: int = 0):
        self.bins = load_bins(cfg.bins)
        self.seed = seed

    def measure(self, wav: np.ndarray, text: str, speech_s: float) -> dict:
        pitch, spread, voiced = pitch_stats(wav)
        syllables = count_syllables(text)
        return {
            "pitch_hz": None if pitch is None else round(pitch, 2),
            "pitch_std": None if spread is None else round(spread, 3),
            "voiced_ratio": round(voiced, 4),
            "speaking_rate": round(syllables / speech_s, 3) if syllables and speech_s > 0 else None,
            "loudness_lufs": None if (lufs := loudness_lufs(wav)) is None else round(lufs, 2),
        }

    def pause_tags(self, pauses: list[tuple[float, float]], words: list[Word]) -> list[dict]:
        """``[pause]`` at each silence of at least ``pause_tag_min_s``; times relative to the segment."""
        tags = []
        for start, end in pauses:
            if end - start >= self.bins["pause_tag_min_s"]:
                middle = (start + end) / 2
                index = sum(1 for w in words if w.end <= middle) if words else None
                tags.append(
                    {"tag": "[pause]", "start": round(start, 3), "end": round(end, 3), "word_index": index}
                )
        return tags

    def caption(self, key: str, m: dict) -> str:
        b = self.bins
        gender = gender_from_pitch(m.get("pitch_hz"), b["gender"])
        voice = [
            bin_word(m.get("pitch_hz"), b["pitch_hz"]),
            bin_word(m.get("pitch_std"), b["pitch_std_semitones"]),
            bin_word(m.get("loudness_lufs"), b["loudness_lufs"]),
            bin_word(m.get("voiced_ratio"), b["voiced_ratio"]),
        ]
        fields = {
            "subject": {"male": "a male speaker", "female": "a female speaker"}.get(gender, "a speaker"),
            "voice": ", ".join(w for w in voice if w) or "plain",
            "rate": bin_word(m.get("speaking_rate"), b["speaking_rate"]),
            "recording": " ".join(
                w
                for w in (
                    bin_word(m.get("snr_db"), b["snr_db"]),
                    bin_word(m.get("bandwidth_hz"), b["bandwidth_hz"]),
                )
                if w
            )
            + " recording",
        }
        fields["Subject"] = fields["subject"][0].upper() + fields["subject"][1:]
        fields["Recording"] = "A " + fields["recording"]
        fields["recording"] = "a " + fields["recording"]
        usable = [t for t in b["templates"] if "{rate}" not in t or fields["rate"]]
        template = usable[zlib.crc32(f"{self.seed}:{key}".encode()) % len(usable)]
        return template.format(**fields)

    def __call__(
        self, key: str, wav: np.ndarray, text: str, words: list[Word], pauses, speech_s: float, extra: dict
    ) -> dict:
        """Measurements, caption and tags of one segment; ``extra`` brings SNR and bandwidth."""
        m = {**self.measure(wav, text, speech_s), **extra}
        return {**m, "caption": self.caption(key, m), "tags": self.pause_tags(pauses, words)}
