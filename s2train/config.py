"""Typed configuration: these dataclasses are the truth, the YAML under ``conf/`` fills them.

They are registered with Hydra's ConfigStore as the schema of ``conf/config.yaml``, so a misspelt key
fails when Hydra composes (``Key 'segmnt_max_s' not in 'VADConfig'``). Values a user must give are
``???``. ``__post_init__`` checks what a type cannot and raises ``ValueError`` with a plain sentence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# ----------------------------------------------------------------------------------------------- data


@dataclass
class DataConfig:
    """Where raw audio comes from and which part of it this process takes."""

    source: str = "folder"  # folder | hf | webdataset
    path: str | None = None  # a folder, a `datasets.save_to_disk` folder, or a folder/glob of .tar
    extensions: list[str] = field(
        default_factory=lambda: ["wav", "flac", "ogg", "mp3", "opus", "aiff", "aif", "au"]
    )
    audio_column: str = "audio"  # hf: the column of audio (decoded or not)
    lang: str | None = None  # language of every file when the source does not say
    partition: int = 0  # this process's share: partition i of num_partitions
    num_partitions: int = 1

    def __post_init__(self) -> None:
        _check(
            self.source in ("folder", "hf", "webdataset"),
            f"data.source must be folder, hf or webdataset, not {self.source!r}",
        )
        _check(self.num_partitions >= 1, "data.num_partitions must be at least 1")
        _check(
            0 <= self.partition < self.num_partitions,
            f"data.partition={self.partition} is outside 0..{self.num_partitions - 1}",
        )


# --------------------------------------------------------------------------------------------- judges


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
        _check(
            0 < self.neg_threshold <= self.threshold < 1, "need 0 < vad.neg_threshold <= vad.threshold < 1"
        )
        _check(
            0 < self.min_segment_s < self.max_segment_s,
            "need 0 < vad.min_segment_s < vad.max_segment_s",
        )


@dataclass
class WhisperConfig:
    checkpoint: str | None = None  # a local openai-whisper .pt file; never a hub name
    language: str | None = None  # None: detect
    temperature: float = 0.0
    beam_size: int | None = None


@dataclass
class ASRConfig:
    backend: str = "pocketsphinx"  # pocketsphinx | whisper
    whisper: WhisperConfig = field(default_factory=WhisperConfig)
    # Filters for hallucinated or unusable transcripts; each one is a reject reason.
    max_ngram_repeats: int = 4  # an n-gram (n = 1..4) repeated back to back more often than this
    min_unique_word_ratio: float = 0.3  # unique words / words, checked from 8 words on
    phantom_phrases: list[str] = field(
        default_factory=lambda: [
            "thank you for watching",
            "thanks for watching",
            "please subscribe",
            "like and subscribe",
            "subtitles by",
            "amara.org",
            "transcribed by",
            "字幕",
            "请不吝点赞",
        ]
    )
    max_compression_ratio: float = 2.4
    min_avg_logprob: float = -1.0  # whisper only: pocketsphinx scores are not log-probabilities
    languages: list[str] = field(default_factory=list)  # keep only these languages; empty keeps all

    def __post_init__(self) -> None:
        _check(
            self.backend in ("pocketsphinx", "whisper"),
            f"judges.asr.backend must be pocketsphinx or whisper, not {self.backend!r}",
        )


@dataclass
class QualityConfig:
    dnsmos_ovrl_min: float = 3.0  # Emilia's keep rule
    calibration: str | None = None  # a JSON file whose dnsmos_ovrl_min replaces the value above
    dnsmos_hop_s: float = 1.0  # the reference DNSMOS script hops its 9 s window by 1 s
    onnx_threads: int = 0  # 0: onnxruntime decides
    snr_min_db: float = 15.0
    clipping_max_ratio: float = 0.001  # fraction of samples at full scale
    bandwidth_min_hz: float = 3500.0  # rejects telephone-band audio


@dataclass
class SpeakerConfig:
    backend: str = "resemblyzer"  # resemblyzer | speechbrain
    checkpoint: str | None = None  # speechbrain: a local folder with hyperparams.yaml
    window_s: float = 1.6
    hop_s: float = 0.8
    min_similarity: float = 0.5  # reject when two windows of one segment are less alike than this

    def __post_init__(self) -> None:
        _check(
            self.backend in ("resemblyzer", "speechbrain"),
            f"judges.speaker.backend must be resemblyzer or speechbrain, not {self.backend!r}",
        )
        _check(0 < self.hop_s <= self.window_s, "need 0 < speaker.hop_s <= speaker.window_s")


@dataclass
class CaptionerConfig:
    bins: str = "v1"  # s2train/judges/caption_bins/<bins>.json, or a path to such a file


@dataclass
class JudgesConfig:
    vad: VADConfig = field(default_factory=VADConfig)
    asr: ASRConfig = field(default_factory=ASRConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    speaker: SpeakerConfig = field(default_factory=SpeakerConfig)
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    device: str = "cpu"
    threads: int = 2  # torch intra-op threads for the judges


# --------------------------------------------------------------------------------------------- stages


@dataclass
class CleanConfig:
    sample_rate: int = 44100  # of the audio in the clean shards
    files_per_shard: int = 16  # a unit of work: this many input files -> one shard + one marker
    block_s: float = 60.0  # decode this much at a time, so memory does not grow with file length
    progress: bool = True

    def __post_init__(self) -> None:
        _check(self.files_per_shard >= 1, "clean.files_per_shard must be at least 1")
        _check(self.sample_rate >= 8000, "clean.sample_rate must be at least 8000")


@dataclass
class DemoCorpusConfig:
    sample_rate: int = 16000
    recordings_per_voice: int = 1
    min_recording_s: float = 20.0
    max_recording_s: float = 40.0
    long_recording_s: float = 45.0  # one recording longer than max_segment_s, to exercise splitting
    calibrate: bool = True  # measure DNSMOS on the good recordings and write a demo threshold

    def __post_init__(self) -> None:
        _check(
            20.0 <= self.min_recording_s <= self.max_recording_s <= 60.0,
            "demo_corpus recordings must be 20-60 s long",
        )


@dataclass
class TokenizeConfig:
    codec: str | None = None  # our codec checkpoint (.pt from save_codec) or a released S2 Pro codec folder
    input: str | None = None  # a clean run directory; None: run_root/name/clean
    batch_size: int = 8  # utterances encoded together (sorted by length, so padding stays small)
    progress: bool = True

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "tokenize.batch_size must be at least 1")


@dataclass
class CodecTrainConfig:
    """``stage=codec``: train the RVQ codec on clean shards (see ``s2train.training.codec_stage``)."""

    input: str | None = None  # a clean run directory; None: run_root/name/clean
    preset: str = "tiny"  # tiny | s2pro (s2train.models.codec)
    segment_s: float = 0.64  # random crop length of every training item, in seconds
    batch_size: int = 4
    num_workers: int = 0  # dataloader worker processes (each takes its share of the utterances)
    max_steps: int = 1000  # codec (generator) updates
    lr: float = 3e-4  # AdamW, betas (0.8, 0.99), for the codec and the discriminator alike
    lr_decay: float = 0.999996  # exponential decay per step (DAC)
    grad_clip: float = 1000.0  # max grad norm of each optimizer's parameters
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {
            "mel/loss": 15.0,
            "stft/loss": 1.0,
            "vq/commitment": 0.25,
            "vq/codebook": 1.0,
            "adv/gen": 1.0,
            "adv/feat": 2.0,
        }
    )
    mel_windows: list[int] = field(default_factory=lambda: [512, 1024, 2048])  # FFT sizes of the mel loss
    mel_bins: list[int] = field(default_factory=lambda: [40, 80, 160])  # mel bands, one per window
    stft_windows: list[int] = field(default_factory=lambda: [512, 1024, 2048])  # STFT loss and discriminator
    adversarial: bool = False  # add the period and STFT discriminators (adv/gen, adv/feat)
    adv_loss: str = "hinge"  # hinge | lsgan
    disc_periods: list[int] = field(default_factory=lambda: [2, 3, 5, 7, 11])
    disc_width: int = 16  # channels of the discriminators' first layers
    dead_code_every: int = 100  # restart unused codes every this many steps; 0: never
    heldout_items: int = 2  # utterances set aside (by a hash of their key) for previews and the final score
    preview_every: int = 500  # write reconstructions of the held-out items every this many steps; 0: never
    checkpoint_every: int = 500  # Lightning checkpoint (and last.ckpt) every this many steps
    log_every: int = 10
    accelerator: str = "auto"  # cpu | gpu | auto
    precision: str = "32-true"  # a Lightning precision: 32-true, bf16-mixed, ...
    threads: int = 0  # torch intra-op threads on a CPU; 0 leaves torch's default
    wandb: bool = False  # also log to Weights & Biases (offline unless WANDB_MODE is set)
    wandb_project: str = "s2train"

    def __post_init__(self) -> None:
        _check(
            self.preset in ("tiny", "s2pro"), f"codec_train.preset must be tiny or s2pro, not {self.preset!r}"
        )
        _check(self.segment_s > 0, "codec_train.segment_s must be positive")
        _check(self.batch_size >= 1, "codec_train.batch_size must be at least 1")
        _check(self.num_workers >= 0, "codec_train.num_workers cannot be negative")
        _check(self.max_steps >= 1, "codec_train.max_steps must be at least 1")
        _check(self.lr > 0 and 0 < self.lr_decay <= 1, "need codec_train.lr > 0 and 0 < lr_decay <= 1")
        _check(self.grad_clip > 0, "codec_train.grad_clip must be positive")
        known = {"mel/loss", "stft/loss", "vq/commitment", "vq/codebook", "adv/gen", "adv/feat"}
        unknown = sorted(set(self.loss_weights) - known)
        _check(
            not unknown,
            f"codec_train.loss_weights has unknown keys {unknown}; the known ones are {sorted(known)}",
        )
        _check(
            len(self.mel_windows) == len(self.mel_bins) > 0,
            "codec_train.mel_windows and mel_bins need the same, non-zero number of entries",
        )
        _check(len(self.stft_windows) > 0, "codec_train.stft_windows cannot be empty")
        _check(
            self.adv_loss in ("hinge", "lsgan"),
            f"codec_train.adv_loss must be hinge or lsgan, not {self.adv_loss!r}",
        )
        _check(self.heldout_items >= 1, "codec_train.heldout_items must be at least 1")
        for name in ("dead_code_every", "preview_every"):
            _check(getattr(self, name) >= 0, f"codec_train.{name} cannot be negative")
        for name in ("checkpoint_every", "log_every", "disc_width"):
            _check(getattr(self, name) >= 1, f"codec_train.{name} must be at least 1")


@dataclass
class PipelineConfig:
    stages: list[str] = field(default_factory=list)  # run in this order, each in run_root/name/<stage>


@dataclass
class S2Config:
    stage: str = MISSING
    name: str = "default"  # the experiment's name: runs go to run_root/name/stage
    run_root: str = "runs"
    run_dir: str | None = None  # overrides run_root/name/stage for this stage
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    judges: JudgesConfig = field(default_factory=JudgesConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    demo_corpus: DemoCorpusConfig = field(default_factory=DemoCorpusConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    codec_train: CodecTrainConfig = field(default_factory=CodecTrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


def register_configs() -> None:
    ConfigStore.instance().store(name="s2train_schema", node=S2Config)
