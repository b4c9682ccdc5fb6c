"""Captioner: bins from the versioned file, the gender band, templates, tags, and measurements on
real voices."""

from __future__ import annotations

import pytest

from s2train.judges.asr import Word
from s2train.judges.captioner import (
    CaptionerConfig,
    RuleCaptioner,
    bin_word,
    count_syllables,
    gender_from_pitch,
    load_bins,
    tagged_text,
)


@pytest.fixture(scope="module")
def captioner():
    return RuleCaptioner(CaptionerConfig())


def test_bins_come_from_the_versioned_file():
    bins = load_bins("v1")
    spec = bins["speaking_rate"]
    assert bins["version"] == "v1"
    assert bin_word(spec["edges"][0] - 0.01, spec) == "slow"
    assert bin_word(spec["edges"][0], spec) == "moderate"  # an edge belongs to the bin above it
    assert bin_word(spec["edges"][1] + 1, spec) == "fast"
    assert bin_word(None, spec) == ""
    with pytest.raises(ValueError, match="shipped versions"):
        load_bins("v999")


def test_gender_has_an_explicit_unknown_band():
    spec = load_bins("v1")["gender"]
    assert gender_from_pitch(100.0, spec) == "male"
    assert gender_from_pitch(230.0, spec) == "female"
    assert gender_from_pitch((spec["male_below_hz"] + spec["female_above_hz"]) / 2, spec) == "unknown"
    assert gender_from_pitch(None, spec) == "unknown"


def test_syllables_for_words_and_characters():
    assert count_syllables("The cat sat") == 3
    assert count_syllables("beautiful morning") == 3 + 2
    assert count_syllables("今天天气很好") == 6


def test_captions_vary_by_key_but_not_between_runs(captioner):
    m = {
        "pitch_hz": 110.0,
        "pitch_std": 2.0,
        "speaking_rate": 4.0,
        "loudness_lufs": -23.0,
        "voiced_ratio": 0.6,
        "snr_db": 50.0,
        "bandwidth_hz": 8000.0,
    }
    captions = {captioner.caption(f"utt{i}", m) for i in range(40)}
    assert len(captions) >= 4
    assert captioner.caption("utt3", m) == RuleCaptioner(CaptionerConfig()).caption("utt3", m)
    assert all("male speaker" in c and "low-pitched" in c and "clean" in c for c in captions)
    unknown = captioner.caption("x", {**m, "pitch_hz": 155.0, "speaking_rate": None})
    assert "a speaker" in unknown.lower() and "pace" not in unknown
    whisper = captioner.caption("x", {**m, "voiced_ratio": 0.05})
    assert "whispery" in whisper


def test_pause_tags_land_between_the_right_words(captioner):
    words = [Word("one", 0.0, 0.4), Word("two", 0.5, 0.9), Word("three", 2.0, 2.4), Word("four", 2.5, 2.8)]
    tags = captioner.pause_tags([(0.4, 0.5), (0.9, 2.0)], words)
    assert tags == [{"tag": "[pause]", "start": 0.9, "end": 2.0, "word_index": 2}]
    assert tagged_text([w.word for w in words], tags) == "one two [pause] three four"
    assert captioner.pause_tags([(1.0, 2.0)], [])[0]["word_index"] is None


def test_measurements_tell_a_low_voice_from_a_high_one(captioner, flite_wav):
    text = "The teacher asked the class to read the first chapter at home."
    low = captioner.measure(flite_wav("awb", text), text, 3.0)
    high = captioner.measure(flite_wav("slt", text), text, 3.0)
    assert low["pitch_hz"] < 150 < high["pitch_hz"]
    assert low["voiced_ratio"] > 0.2 and high["voiced_ratio"] > 0.2
    assert low["speaking_rate"] == pytest.approx(count_syllables(text) / 3.0, rel=1e-3)
    assert -40 < low["loudness_lufs"] < -5


# ------------------------------------------------------------------------------- inline tags (v2 bins)

SENTENCE = "please put the green box on the table near the window".split()


def _spoken(words: list[str], *, stretch=(), gap_after=(), louder=(), whisper=(), voice="awb"):
    """Words synthesised one at a time and strung together, so every word's time is known exactly.
    ``stretch``/``louder``/``whisper``: {index: factor} or indices; ``gap_after``: {index: seconds}."""
    import librosa
    import numpy as np

    from data_pipeline.demo_corpus import synthesize

    rng = np.random.default_rng(0)
    pieces, timed, t = [np.zeros(1600, np.float32)], [], 0.1
    for i, word in enumerate(words):
        audio = synthesize(voice, word, 16000, dict(stretch).get(i, 1.0))
        loud = np.flatnonzero(np.abs(audio) > 0.02 * np.abs(audio).max())
        audio = audio[max(loud[0] - 80, 0) : loud[-1] + 80]
        if i in whisper:  # the same spectrum with random phase: the energy of speech, no pitch
            spec = librosa.stft(audio, n_fft=512, hop_length=128)
            phase = np.exp(2j * np.pi * rng.random(spec.shape))
            audio = librosa.istft(np.abs(spec) * phase, hop_length=128, length=len(audio)).astype(np.float32)
        if i in louder:
            audio = audio * 4.0  # +12 dB
        pieces.append(audio)
        timed.append(Word(word, round(t, 4), round(t + len(audio) / 16000, 4)))
        t += len(audio) / 16000
        gap = dict(gap_after).get(i, 0.05 * dict(stretch).get(i, 1.0))
        pieces.append(np.zeros(int(gap * 16000), np.float32))
        t += int(gap * 16000) / 16000
    pieces.append(np.zeros(1600, np.float32))
    wav = np.concatenate(pieces) * 0.5 + np.random.default_rng(1).normal(0, 3e-4, sum(map(len, pieces)))
    return wav.astype(np.float32), timed


def _tags(captioner, wav, words):
    from s2train.judges.captioner import pitch_track

    return [(t["tag"], t["word_index"]) for t in captioner.word_tags(wav, words, pitch_track(wav))]


def test_v2_tags_nothing_on_a_neutral_sentence(captioner):
    assert load_bins(captioner.bins["version"])["tags"]
    wav, words = _spoken(SENTENCE, gap_after={3: 0.3, 7: 0.3})  # three stretches at one rate
    assert _tags(captioner, wav, words) == []


def test_emphasis_marks_the_louder_word_only(captioner):
    wav, words = _spoken(SENTENCE, louder={3})
    assert _tags(captioner, wav, words) == [("[emphasis]", 3)]
    assert tagged_text(SENTENCE, captioner.word_tags(wav, words, None)).startswith(
        "please put the [emphasis] green"
    )


def test_whisper_marks_a_run_of_unvoiced_words(captioner):
    wav, words = _spoken(SENTENCE, whisper={3, 4})
    tags = [t for t in _tags(captioner, wav, words) if t[0] != "[emphasis]"]
    assert tags == [("[whisper]", 3)]


@pytest.mark.parametrize(("factor", "tag"), [(0.55, "[fast]"), (1.8, "[slow]")])
def test_fast_and_slow_mark_a_stretch_against_the_segments_own_rate(captioner, factor, tag):
    stretch = {i: factor for i in range(4, 8)}  # "box on the table"
    wav, words = _spoken(SENTENCE, stretch=stretch, gap_after={3: 0.3, 7: 0.3})
    assert _tags(captioner, wav, words) == [(tag, 4)]


def test_pauses_and_long_pauses(captioner):
    words = [Word("a", 0.0, 0.3), Word("b", 0.9, 1.2), Word("c", 2.8, 3.0)]
    tags = captioner.pause_tags([(0.3, 0.9), (1.2, 2.8), (3.0, 3.2)], words)
    assert [(t["tag"], t["word_index"]) for t in tags] == [("[pause]", 1), ("[long pause]", 2)]
    old = RuleCaptioner(CaptionerConfig(bins="v1")).pause_tags([(1.2, 2.8)], words)
    assert [t["tag"] for t in old] == ["[pause]"]  # v1 captions stay what they were
