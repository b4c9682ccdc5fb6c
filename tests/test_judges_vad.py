"""VAD: hysteresis on frame probabilities, the segmenter's merge/split rules, and silero on real speech
streamed in blocks of any size."""

from __future__ import annotations

import numpy as np
import pytest

from s2train.audio import ArrayReader, stream_mono
from s2train.judges.vad import FRAME_S, Segment, SileroVAD, VADConfig, plan_segments, speech_regions


def probs_for(pattern: list[tuple[float, float]]) -> np.ndarray:
    """Frame probabilities from ``[(seconds, probability), ...]``."""
    return np.concatenate([np.full(int(round(s / FRAME_S)), p, np.float32) for s, p in pattern])


def test_regions_use_hysteresis_and_drop_blips():
    cfg = VADConfig(pad_s=0.0, min_silence_s=0.1, min_speech_s=0.25)
    probs = probs_for([(1.0, 0.0), (2.0, 0.9), (0.5, 0.4), (1.0, 0.9), (1.0, 0.0), (0.1, 0.9), (1.0, 0.0)])
    regions = speech_regions(probs, cfg, len(probs) * FRAME_S)
    # 0.4 lies between neg_threshold and threshold: the region carries on through it
    assert len(regions) == 1
    assert regions[0][0] == pytest.approx(1.0, abs=FRAME_S) and regions[0][1] == pytest.approx(
        4.5, abs=FRAME_S
    )


def test_regions_split_on_silence_and_pad_within_bounds():
    cfg = VADConfig(pad_s=0.2)
    probs = probs_for([(0.1, 0.0), (1.0, 0.9), (0.3, 0.0), (1.0, 0.9)])
    regions = speech_regions(probs, cfg, len(probs) * FRAME_S)
    assert len(regions) == 2
    assert regions[0][0] == 0.0  # padding stops at the start of the recording
    assert regions[0][1] <= regions[1][0]  # and never makes neighbours overlap
    assert regions[1][1] == pytest.approx(len(probs) * FRAME_S, abs=1e-3)


def test_segmenter_merges_short_gaps_and_rejects_short_segments():
    cfg = VADConfig(merge_gap_s=1.0, min_segment_s=3.0, max_segment_s=30.0)
    kept, short = plan_segments([(0.0, 2.0), (2.5, 5.0), (8.0, 9.5), (20.0, 25.0)], cfg)
    assert [(s.start, s.end) for s in kept] == [(0.0, 5.0), (20.0, 25.0)]
    assert [(s.start, s.end) for s in short] == [(8.0, 9.5)]
    assert kept[0].pauses == [(2.0, 2.5)]


def test_segmenter_splits_long_speech_at_its_longest_silence():
    cfg = VADConfig(merge_gap_s=1.0, min_segment_s=3.0, max_segment_s=30.0)
    regions = [(0, 9.0), (9.3, 18.0), (18.9, 27.0), (27.4, 40.0)]
    kept, short = plan_segments(regions, cfg)
    assert not short and [(s.start, s.end) for s in kept] == [(0, 18.0), (18.9, 40.0)]
    assert all(s.duration <= 30.0 for s in kept)


def test_segmenter_prefers_a_split_that_leaves_both_sides_long_enough():
    cfg = VADConfig(merge_gap_s=1.0, min_segment_s=3.0, max_segment_s=30.0)
    regions = [(0, 1.0), (1.9, 16.0), (16.5, 32.0)]  # the longest gap would strand a 1 s piece
    kept, short = plan_segments(regions, cfg)
    assert not short and [(s.start, s.end) for s in kept] == [(0, 16.0), (16.5, 32.0)]


def test_segmenter_cuts_unbroken_speech_into_equal_parts():
    kept, _ = plan_segments([(0.0, 70.0)], VADConfig())
    assert len(kept) == 3 and all(s.duration <= 30.0 for s in kept)
    assert kept[0].start == 0.0 and kept[-1].end == 70.0
    assert Segment(0, 4, [(0, 1), (2, 4)]).pauses == [(1, 2)]


@pytest.fixture(scope="module")
def vad():
    return SileroVAD(VADConfig())


def test_silero_finds_the_sentences_and_ignores_the_gap(vad, flite_wav):
    a, b = (
        flite_wav("awb", "The river was high after a week of heavy rain."),
        flite_wav("slt", "Please close the window."),
    )
    silence = np.zeros(int(1.5 * 16000), np.float32)
    wav = np.concatenate([silence, a, silence, b, silence])
    [regions] = vad([wav])
    assert len(regions) == 2
    assert regions[0][0] == pytest.approx(1.5, abs=0.25) and regions[1][1] == pytest.approx(
        (len(wav) - len(silence)) / 16000, abs=0.3
    )
    assert vad([np.zeros(5 * 16000, np.float32)]) == [[]]


def test_streaming_in_blocks_gives_the_same_probabilities(vad, flite_wav):
    wav = np.concatenate([flite_wav("kal", "We should buy some milk and eggs on the way home.")] * 2)
    reader = ArrayReader(wav, 16000)
    whole = vad.probabilities([wav])
    for block_s in (0.37, 1.0, 3.3):
        np.testing.assert_allclose(vad.probabilities(stream_mono(reader, 16000, block_s)), whole, atol=1e-5)
