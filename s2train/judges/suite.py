"""The judge suite: every model that cleans data, scores rewards and computes metrics, built lazily.

``JudgeSuite(cfg)`` builds nothing when it is made: each judge is built from its config section on first
use and kept, so a stage that needs only the ASR loads only the ASR. Cleaning, the codec stage's
held-out WER, evaluation and GRPO rewards all take their judges from it. ``check_paths`` refuses a
missing local model, with a sentence naming its config key, before anything loads (say, before an
evaluation spends an hour generating).

    suite = JudgeSuite(cfg.judges, seed=cfg.seed)
    suite.check_paths("asr")
    [transcript] = suite.asr([wav_16k], ["en"])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from s2train.checks import check
from s2train.judges.asr import ASRConfig, ParaformerASR, PocketSphinxASR, WhisperASR, build_asr
from s2train.judges.asr import check_paths as check_asr_paths
from s2train.judges.captioner import CaptionerConfig, RuleCaptioner
from s2train.judges.quality import DNSMOS, QualityConfig, QualityJudge, dnsmos_model
from s2train.judges.quality import check_paths as check_quality_paths
from s2train.judges.speaker import Embedder, SpeakerConfig, SpeakerJudge, build_embedder
from s2train.judges.speaker import check_paths as check_speaker_paths
from s2train.judges.vad import SileroVAD, VADConfig


@dataclass
class JudgesConfig:
    vad: VADConfig = field(default_factory=VADConfig)
    asr: ASRConfig = field(default_factory=ASRConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    speaker: SpeakerConfig = field(default_factory=SpeakerConfig)
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    device: str = "cpu"
    threads: int = 2  # torch intra-op threads of clean and tokenize; 0: torch's default

    def __post_init__(self) -> None:
        check(
            self.threads >= 0, f"judges.threads cannot be negative (0: torch's default), not {self.threads}"
        )


JUDGES = ("vad", "quality", "speaker", "asr", "captioner", "embedder", "dnsmos")


class JudgeSuite:
    """The judges of one process, each built on first use from ``cfg`` and kept.

    - ``vad``: silero-vad (``judges.vad``);
    - ``quality``: DNSMOS, SNR, clipping, bandwidth and their keep rule (``judges.quality``);
    - ``speaker``: the one-speaker check of cleaning, on ``embedder`` (``judges.speaker``);
    - ``asr``: pocketsphinx, whisper or paraformer (``judges.asr``);
    - ``captioner``: the rule-based captioner (``judges.captioner``; ``seed`` picks its templates);
    - ``embedder``: the speaker-embedding model, for similarity (``judges.speaker.backend``);
    - ``dnsmos``: speechmos's DNSMOS models alone (``judges.quality.onnx_threads``).
    """

    def __init__(self, cfg: JudgesConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed

    def check_paths(self, *judges: str) -> None:
        """Raise the ValueError that building ``judges`` (default: all of them) would raise for a missing
        local model or file, without building anything."""
        unknown = [name for name in judges if name not in JUDGES]
        if unknown:
            raise ValueError(f"unknown judge {unknown[0]!r}; the suite has {', '.join(JUDGES)}")
        names = set(judges or JUDGES)
        if "asr" in names:
            check_asr_paths(self.cfg.asr)
        if names & {"speaker", "embedder"}:
            check_speaker_paths(self.cfg.speaker)
        if "quality" in names:
            check_quality_paths(self.cfg.quality)

    @cached_property
    def vad(self) -> SileroVAD:
        return SileroVAD(self.cfg.vad)

    @cached_property
    def quality(self) -> QualityJudge:
        return QualityJudge(self.cfg.quality)

    @cached_property
    def speaker(self) -> SpeakerJudge:
        return SpeakerJudge(self.cfg.speaker, self.cfg.device, embedder=self.embedder)

    @cached_property
    def asr(self) -> PocketSphinxASR | WhisperASR | ParaformerASR:
        return build_asr(self.cfg.asr, self.cfg.device)

    @cached_property
    def captioner(self) -> RuleCaptioner:
        return RuleCaptioner(self.cfg.captioner, self.seed)

    @cached_property
    def embedder(self) -> Embedder:
        return build_embedder(self.cfg.speaker, self.cfg.device)

    @cached_property
    def dnsmos(self) -> DNSMOS:
        """``dnsmos(wav_16k, hop_s) -> {ovrl, sig, bak, p808}``, the sessions the quality judge uses too."""
        return dnsmos_model(self.cfg.quality.onnx_threads)
