"""The judge suite: every model that cleans data, scores rewards and computes metrics, built lazily."""

from __future__ import annotations

from dataclasses import dataclass, field

from s2train.judges.asr import ASRConfig
from s2train.judges.captioner import CaptionerConfig
from s2train.judges.quality import QualityConfig
from s2train.judges.speaker import SpeakerConfig
from s2train.judges.vad import VADConfig


@dataclass
class JudgesConfig:
    vad: VADConfig = field(default_factory=VADConfig)
    asr: ASRConfig = field(default_factory=ASRConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    speaker: SpeakerConfig = field(default_factory=SpeakerConfig)
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    device: str = "cpu"
    threads: int = 2  # torch intra-op threads for the judges
