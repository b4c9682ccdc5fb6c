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
