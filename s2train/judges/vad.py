"""Voice activity: silero-vad frame probabilities -> speech regions -> 3-30 s segments.

The silero model (its weights ship in the ``silero-vad`` wheel) is run frame by frame with its state
carried across blocks, so a recording of any length is scored in bounded memory. Turning probabilities
into regions and regions into segments is plain arithmetic, kept here and unit-tested on its own.

Times are seconds from the start of the recording.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from s2train.checks import check
from s2train.judges import JUDGE_RATE


@dataclass
class VADConfig:
    """silero-vad frame probabilities, turned into speech regions, then into 3-30 s segments."""

    threshold: float = 0.5  # a frame is speech above this probability
    neg_threshold: float = 0.35  # ... and stays speech until it falls below this one
    min_speech_s: float = 0.25  # shorter bursts are dropped
    min_silence_s: float = 0.1  # shorter dips are bridged inside one region
    pad_s: float = 0.1  # kept around each region
    min_segment_s: float = 3.0
    max_segment_s: float = 30.0
    merge_gap_s: float = 1.0  # regions closer than this join one segment (while it fits max_segment_s)

    def __post_init__(self) -> None:
        check(0 < self.neg_threshold <= self.threshold < 1, "need 0 < vad.neg_threshold <= vad.threshold < 1")
        check(
            0 < self.min_segment_s < self.max_segment_s,
            "need 0 < vad.min_segment_s < vad.max_segment_s",
        )


FRAME = 512  # samples per silero frame at 16 kHz (32 ms)
FRAME_S = FRAME / JUDGE_RATE

Region = tuple[float, float]


class SileroVAD:
    """Speech probability per 32 ms frame, from the silero-vad model shipped in its wheel."""

    def __init__(self, cfg: VADConfig):
        from silero_vad import load_silero_vad

        self.cfg = cfg
        self.model = load_silero_vad()

    @torch.inference_mode()
    def probabilities(self, blocks: Iterable[np.ndarray]) -> np.ndarray:
        """Probabilities ``(F,)`` for a recording given as consecutive 16 kHz mono blocks."""
        self.model.reset_states()
        probs: list[float] = []
        carry = np.zeros(0, np.float32)
        for block in blocks:
            samples = np.concatenate([carry, block]) if len(carry) else block
            usable = len(samples) // FRAME * FRAME  # 0 when block + carry is under one frame
            frames = torch.from_numpy(np.ascontiguousarray(samples[:usable], dtype=np.float32))
            for frame in frames.split(FRAME) if usable else ():
                probs.append(float(self.model(frame, JUDGE_RATE)))
            carry = samples[usable:]
        if len(carry):
            tail = torch.from_numpy(np.pad(carry, (0, FRAME - len(carry))).astype(np.float32))
            probs.append(float(self.model(tail, JUDGE_RATE)))
        return np.asarray(probs, dtype=np.float32)

    def __call__(self, wavs: list[np.ndarray]) -> list[list[Region]]:
        """Speech regions of each 16 kHz waveform."""
        return [speech_regions(self.probabilities([wav]), self.cfg, len(wav) / JUDGE_RATE) for wav in wavs]


def speech_regions(probs: np.ndarray, cfg: VADConfig, duration: float) -> list[Region]:
    """Hysteresis on frame probabilities: on above ``threshold``, off after ``min_silence_s`` below
    ``neg_threshold``; regions shorter than ``min_speech_s`` are dropped, the rest padded by ``pad_s``
    (never past the middle of the gap to a neighbour, nor outside the recording)."""
    min_silence = max(1, int(round(cfg.min_silence_s / FRAME_S)))
    raw: list[tuple[int, int]] = []
    start, below = None, 0
    for i, p in enumerate(probs):
        if start is None:
            if p >= cfg.threshold:
                start, below = i, 0
        elif p < cfg.neg_threshold:
            below += 1
            if below >= min_silence:
                raw.append((start, i - below + 1))
                start = None
        else:
            below = 0
    if start is not None:
        raw.append((start, len(probs) - below))
    regions = [(a * FRAME_S, b * FRAME_S) for a, b in raw if (b - a) * FRAME_S >= cfg.min_speech_s]
    padded: list[Region] = []
    for i, (a, b) in enumerate(regions):
        left = regions[i - 1][1] if i else 0.0
        right = regions[i + 1][0] if i + 1 < len(regions) else duration
        a = max(a - cfg.pad_s, (left + a) / 2 if i else 0.0)
        b = min(b + cfg.pad_s, (b + right) / 2 if i + 1 < len(regions) else duration)
        padded.append((round(a, 3), round(b, 3)))
    return padded


@dataclass
class Segment:
    """A stretch of speech to keep or reject as one unit, with the speech regions inside it."""

    start: float
    end: float
    regions: list[Region] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def pauses(self) -> list[Region]:
        """The silences between the regions inside this segment."""
        return [(a[1], b[0]) for a, b in zip(self.regions, self.regions[1:]) if b[0] > a[1]]


def plan_segments(regions: list[Region], cfg: VADConfig) -> tuple[list[Segment], list[Segment]]:
    """Merge regions separated by at most ``merge_gap_s``; split what is longer than ``max_segment_s``
    at its longest silence (one that leaves both sides at least ``min_segment_s`` when there is one),
    or in equal parts where a region has no silence at all. Returns ``(kept, too_short)``."""
    groups: list[list[Region]] = []
    for region in regions:
        if groups and region[0] - groups[-1][-1][1] <= cfg.merge_gap_s:
            groups[-1].append(region)
        else:
            groups.append([region])
    segments: list[Segment] = []
    for group in groups:
        segments.extend(_split(group, cfg))
    kept = [s for s in segments if s.duration >= cfg.min_segment_s]
    short = [s for s in segments if s.duration < cfg.min_segment_s]
    return kept, short


def _split(group: list[Region], cfg: VADConfig) -> list[Segment]:
    start, end = group[0][0], group[-1][1]
    if end - start <= cfg.max_segment_s:
        return [Segment(start, end, list(group))]
    if len(group) == 1:  # one unbroken region: equal parts, each at most max_segment_s
        parts = int(np.ceil((end - start) / cfg.max_segment_s))
        edges = np.linspace(start, end, parts + 1).round(3)
        return [Segment(float(a), float(b), [(float(a), float(b))]) for a, b in zip(edges, edges[1:])]
    gaps = [(group[i + 1][0] - group[i][1], i) for i in range(len(group) - 1)]
    balanced = [
        (gap, i)
        for gap, i in gaps
        if group[i][1] - start >= cfg.min_segment_s and end - group[i + 1][0] >= cfg.min_segment_s
    ]
    _, cut = max(balanced or gaps)
    return _split(group[: cut + 1], cfg) + _split(group[cut + 1 :], cfg)
