"""A rule-based, offline speech captioner: measurements -> binned words -> a caption and inline tags.

Measurements: pitch (median and spread in semitones, from librosa's pYIN), voiced ratio, speaking rate
(syllables per second of speech), loudness (LUFS, pyloudnorm), SNR and bandwidth (from the quality
judge) and the pauses inside the segment. A versioned bin-edge file (``caption_bins/v2.json``) turns
them into words; gender is guessed from pitch with an explicit unknown band. The caption is written
from varied templates (picked by a hash of the segment id, so reruns agree). A learned captioner fills
the same fields later.

Inline tags, placed by the word timings the ASR gives (``word_index``: the tag goes before that word;
thresholds under ``tags`` in the bin file):

- ``[pause]`` / ``[long pause]``: a silence of at least ``pause_min_s`` / ``long_pause_min_s``;
- ``[emphasis]``: a word ``emphasis_db`` louder, or ``emphasis_semitones`` higher, than the median of
  its ``emphasis_neighbours`` neighbours either side;
- ``[whisper]``: a run of words with voicing in at most ``whisper_voiced_max`` of their frames, yet
  audible (a whisper has its energy but not its pitch);
- ``[fast]`` / ``[slow]``: a stretch of words between gaps of ``span_gap_s`` whose syllable rate is at
  least ``fast_ratio`` / at most ``slow_ratio`` times the segment's own (the median stretch's rate; it
  takes three stretches to have one).

v1 bin files (no ``tags``) give ``[pause]`` alone, as they always did.
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
    bins: str = "v2"  # s2train/judges/caption_bins/<bins>.json, or a path to such a file


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


PITCH_HOP = 320  # samples between pYIN frames (20 ms at 16 kHz)


CAPTION_MEASURES = (  # what a caption is phrased from (the measurements clean keeps in each record)
    "pitch_hz",
    "pitch_std",
    "loudness_lufs",
    "voiced_ratio",
    "speaking_rate",
    "snr_db",
    "bandwidth_hz",
)


def phrase_caption(bins: dict, m: dict, pick: int) -> str:
    """The caption of measurements ``m`` in words of ``bins``, in its ``pick``-th usable template (modulo
    their number): the captioner picks by a hash of the segment id; training may pick anew each draw."""
    b = bins
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
    return usable[pick % len(usable)].format(**fields)


@dataclass
class PitchTrack:
    f0: np.ndarray  # (frames,) Hz, NaN where unvoiced
    voiced: np.ndarray  # (frames,) bool

    def frames(self, start_s: float, end_s: float) -> slice:
        hop_s = PITCH_HOP / JUDGE_RATE
        return slice(
            int(round(start_s / hop_s)), max(int(round(end_s / hop_s)), int(round(start_s / hop_s)) + 1)
        )


def pitch_track(wav: np.ndarray) -> PitchTrack | None:
    """librosa's pYIN over the segment (None when it is too short to track)."""
    import librosa

    if len(wav) < 2048:
        return None
    f0, voiced, _ = librosa.pyin(
        wav.astype(np.float32), fmin=60.0, fmax=500.0, sr=JUDGE_RATE, frame_length=1024, hop_length=PITCH_HOP
    )
    return PitchTrack(f0, voiced & np.isfinite(f0))


def pitch_stats(wav: np.ndarray, track: PitchTrack | None = None) -> tuple[float | None, float | None, float]:
    """``(median f0 Hz, f0 spread in semitones, voiced ratio)`` from pYIN."""
    track = track if track is not None else pitch_track(wav)
    if track is None:
        return None, None, 0.0
    f0 = track.f0[track.voiced]
    ratio = float(np.mean(track.voiced)) if len(track.voiced) else 0.0
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

    def measure(self, wav: np.ndarray, text: str, speech_s: float, track: PitchTrack | None = None) -> dict:
        pitch, spread, voiced = pitch_stats(wav, track)
        syllables = count_syllables(text)
        return {
            "pitch_hz": None if pitch is None else round(pitch, 2),
            "pitch_std": None if spread is None else round(spread, 3),
            "voiced_ratio": round(voiced, 4),
            "speaking_rate": round(syllables / speech_s, 3) if syllables and speech_s > 0 else None,
            "loudness_lufs": None if (lufs := loudness_lufs(wav)) is None else round(lufs, 2),
        }

    def pause_tags(self, pauses: list[tuple[float, float]], words: list[Word]) -> list[dict]:
        """``[pause]`` (and, with v2 bins, ``[long pause]``) at each silence long enough; times relative
        to the segment."""
        spec = self.bins.get("tags")
        shortest = spec["pause_min_s"] if spec else self.bins["pause_tag_min_s"]
        tags = []
        for start, end in pauses:
            if end - start >= shortest:
                middle = (start + end) / 2
                index = sum(1 for w in words if w.end <= middle) if words else None
                name = "[long pause]" if spec and end - start >= spec["long_pause_min_s"] else "[pause]"
                tags.append(
                    {"tag": name, "start": round(start, 3), "end": round(end, 3), "word_index": index}
                )
        return tags

    def word_tags(self, wav: np.ndarray, words: list[Word], track: PitchTrack | None) -> list[dict]:
        """``[emphasis]``, ``[whisper]``, ``[fast]`` and ``[slow]`` from the words' timings (v2 bins)."""
        spec = self.bins.get("tags")
        if not spec or not words:
            return []
        tags = []

        def tag(name: str, first: int, last: int) -> None:
            tags.append(
                {
                    "tag": name,
                    "start": round(words[first].start, 3),
                    "end": round(words[last].end, 3),
                    "word_index": first,
                }
            )

        level, pitch, voiced = [], [], []
        for w in words:
            piece = wav[
                int(w.start * JUDGE_RATE) : max(int(w.end * JUDGE_RATE), int(w.start * JUDGE_RATE) + 1)
            ]
            level.append(20 * np.log10(float(np.sqrt(np.mean(piece.astype(np.float64) ** 2))) + 1e-9))
            frames = track.frames(w.start, w.end) if track is not None else slice(0, 0)
            f0 = track.f0[frames][track.voiced[frames]] if track is not None else np.zeros(0)
            pitch.append(12 * np.log2(np.median(f0)) if len(f0) else np.nan)
            voiced.append(
                float(np.mean(track.voiced[frames]))
                if track is not None and len(track.voiced[frames])
                else np.nan
            )
        level, pitch = np.array(level), np.array(pitch)

        reach = spec["emphasis_neighbours"]
        for i, w in enumerate(words):
            if w.end - w.start < spec["emphasis_min_word_s"]:
                continue
            around = [j for j in range(max(0, i - reach), min(len(words), i + reach + 1)) if j != i]
            if len(around) < 2:
                continue
            louder = level[i] - np.median(level[around]) >= spec["emphasis_db"]
            others = pitch[around][np.isfinite(pitch[around])]
            higher = (
                np.isfinite(pitch[i])
                and len(others) >= 2
                and pitch[i] - np.median(others) >= spec["emphasis_semitones"]
            )
            if louder or higher:
                tag("[emphasis]", i, i)

        whispered = [
            w.end - w.start >= spec["whisper_min_word_s"]
            and np.isfinite(voiced[i])
            and voiced[i] <= spec["whisper_voiced_max"]
            and level[i] >= spec["whisper_min_dbfs"]
            for i, w in enumerate(words)
        ]
        for i, yes in enumerate(whispered):
            if yes and (i == 0 or not whispered[i - 1]):
                last = i
                while last + 1 < len(words) and whispered[last + 1]:
                    last += 1
                tag("[whisper]", i, last)

        spans, first = [], 0  # stretches of words between gaps
        for i in range(1, len(words) + 1):
            if i == len(words) or words[i].start - words[i - 1].end >= spec["span_gap_s"]:
                spans.append((first, i - 1))
                first = i
        rates = [
            (a, b, sum(count_syllables(w.word) for w in words[a : b + 1]) / (words[b].end - words[a].start))
            for a, b in spans
            if b > a and words[b].end > words[a].start
        ]
        if len(rates) >= 3:  # the speaker's own rate: the median stretch's, which one odd stretch cannot move
            own = float(np.median([r for *_, r in rates]))
            for a, b, rate in rates:
                if b - a + 1 >= spec["span_min_words"] and own > 0:
                    if rate / own >= spec["fast_ratio"]:
                        tag("[fast]", a, b)
                    elif rate / own <= spec["slow_ratio"]:
                        tag("[slow]", a, b)
        return tags

    def caption(self, key: str, m: dict) -> str:
        return phrase_caption(self.bins, m, zlib.crc32(f"{self.seed}:{key}".encode()))

    def __call__(
        self, key: str, wav: np.ndarray, text: str, words: list[Word], pauses, speech_s: float, extra: dict
    ) -> dict:
        """Measurements, caption and tags of one segment; ``extra`` brings SNR and bandwidth."""
        track = pitch_track(wav)
        m = {**self.measure(wav, text, speech_s, track), **extra}
        tags = self.pause_tags(pauses, words) + self.word_tags(wav, words, track)
        tags.sort(key=lambda t: (t["start"], t["tag"]))
        return {**m, "caption": self.caption(key, m), "tags": tags}
