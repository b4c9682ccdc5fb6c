"""Typed configuration: these dataclasses are the truth, the YAML under ``conf/`` fills them.

They are registered with Hydra's ConfigStore as the schema of ``conf/config.yaml``, so a misspelt key
fails when Hydra composes (``Key 'segmnt_max_s' not in 'VADConfig'``). Values a user must give are
``???``. ``__post_init__`` checks what a type cannot and raises ``ValueError`` with a plain sentence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from s2train.inference.sampling import SamplingParams
from s2train.models.codec import CodecConfig
from s2train.models.codec import tiny as codec_tiny
from s2train.models.dual_ar import DualARConfig
from s2train.models.dual_ar import tiny as dual_ar_tiny


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
    segment_s: float = 0.64  # random crop length of every training item, in seconds
    batch_size: int = 4
    num_workers: int = 0  # dataloader worker processes (each takes its share of the utterances)
    max_steps: int = 1000  # codec (generator) updates
    lr: float = 3e-4  # AdamW, betas (0.8, 0.99), for the codec and the discriminator alike
    lr_decay: float = 0.999996  # exponential decay per step (DAC)
    lr_cooldown: float = 0.0  # the last this share of max_steps takes the lr linearly down to zero
    warmup_steps: int = 100  # linear LR warm-up; the quantizer is bypassed as long (at most half the run),
    # then its codebooks start from the encoder's outputs: young codebooks otherwise collapse
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
        _check(self.segment_s > 0, "codec_train.segment_s must be positive")
        _check(self.batch_size >= 1, "codec_train.batch_size must be at least 1")
        _check(self.num_workers >= 0, "codec_train.num_workers cannot be negative")
        _check(self.max_steps >= 1, "codec_train.max_steps must be at least 1")
        _check(self.lr > 0 and 0 < self.lr_decay <= 1, "need codec_train.lr > 0 and 0 < lr_decay <= 1")
        _check(0 <= self.lr_cooldown <= 1, "codec_train.lr_cooldown is a share of max_steps: 0 to 1")
        _check(self.grad_clip > 0, "codec_train.grad_clip must be positive")
        _check(self.warmup_steps >= 0, "codec_train.warmup_steps cannot be negative")
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


# ----------------------------------------------------------------------------------------------- text


@dataclass
class TextConfig:
    """The text tokenizer (``s2train.text.tokenizer``) and the prompt format that training and inference
    share: ``byte`` (UTF-8 bytes, then the specials; nothing to download, the demo) or ``hf`` (a local
    Hugging Face ``tokenizer.json``, e.g. the released S2 Pro's Qwen3 tokenizer)."""

    kind: str = "byte"  # byte | hf
    path: str | None = None  # hf: a folder with tokenizer.json, or the file
    n_speakers: int = 4  # <|speaker:0|>..<|speaker:n-1|>: byte makes them, hf must hold at least these
    n_semantic: int = 64  # semantic tokens = the codec's semantic codebook size (tiny 64, s2pro 4096)
    system_turn: bool = True  # prompts without a reference open with upstream's system turn; false: none

    def __post_init__(self) -> None:
        _check(self.kind in ("byte", "hf"), f"text.kind must be byte or hf, not {self.kind!r}")
        _check(self.kind != "hf" or bool(self.path), "text.kind=hf needs text.path (a tokenizer.json folder)")
        _check(self.n_speakers >= 1, "text.n_speakers must be at least 1")
        _check(self.n_semantic >= 1, "text.n_semantic must be at least 1")


@dataclass
class LMDataConfig:
    """Token shards -> packed Dual-AR training sequences (``s2train.training.lm_data``)."""

    input: str | None = None  # a tokenize run dir, a folder or glob of token .tar, or a save_to_disk folder
    max_len: int = 2048  # input positions of one packed sequence
    overlong: str = "drop"  # an utterance longer than max_len: drop | cut (keep its first max_len positions)
    shuffle: bool = True  # a seeded new order every epoch
    loop: bool = True  # endless: every reader runs epoch after epoch (training); false: one pass
    hf_rows_per_unit: int = 1024  # a save_to_disk dataset is split into units of this many rows

    def __post_init__(self) -> None:
        _check(self.max_len >= 8, "lm_data.max_len must be at least 8")
        _check(
            self.overlong in ("drop", "cut"), f"lm_data.overlong must be drop or cut, not {self.overlong!r}"
        )
        _check(self.hf_rows_per_unit >= 1, "lm_data.hf_rows_per_unit must be at least 1")


@dataclass
class LMTrainConfig:
    """Training the Dual-AR model (``stage=pretrain``; later stages share it): optimisation, schedule,
    precision, checkpoints and logging. The distribution strategy is the ``strategy`` group."""

    max_steps: int = 1000  # optimizer steps
    batch_size: int = 8  # packed sequences per device and step
    num_workers: int = 0  # dataloader worker processes per rank (each one a data reader)
    lr: float = 3e-4  # peak AdamW learning rate
    min_lr_ratio: float = 0.1  # the cosine ends at lr * this
    warmup_steps: int = 100  # linear warm-up from 0, then cosine down to min_lr_ratio * lr at max_steps
    weight_decay: float = 0.1  # matrices only: vectors (norms, biases) and embeddings get none
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    loss_weights: dict[str, float] = field(default_factory=lambda: {"loss/slow": 1.0, "loss/fast": 1.0})
    include_c0: bool = True  # also train fast output 0 on c0, as S2 does
    activation_checkpointing: bool = False  # recompute every transformer block in the backward pass
    accelerator: str = "auto"  # cpu | gpu | auto
    devices: int = 1  # per node
    num_nodes: int = 1
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU; or any Lightning precision
    threads: int = 0  # torch intra-op threads on a CPU; 0 leaves torch's default
    checkpoint_every: int = 500  # Lightning checkpoint (and last.ckpt) every this many steps
    log_every: int = 10
    progress: bool = True  # a progress bar
    wandb: bool = False  # also log to Weights & Biases (offline unless WANDB_MODE is set)
    wandb_project: str = "s2train"

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "devices", "num_nodes", "checkpoint_every", "log_every"):
            _check(getattr(self, name) >= 1, f"train.{name} must be at least 1, not {getattr(self, name)}")
        _check(
            self.num_workers >= 0 and self.threads >= 0,
            "train.num_workers and train.threads cannot be negative",
        )
        _check(self.lr > 0, "train.lr must be positive")
        _check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio must be between 0 and 1")
        _check(0 <= self.warmup_steps < self.max_steps, "train.warmup_steps must be below train.max_steps")
        _check(
            self.weight_decay >= 0 and self.grad_clip >= 0,
            "train.weight_decay and grad_clip cannot be negative",
        )
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "train.betas must be two values in [0, 1)",
        )
        unknown = set(self.loss_weights) - {"loss/slow", "loss/fast"}
        _check(
            not unknown,
            f"train.loss_weights has unknown keys {sorted(unknown)}; the keys are loss/slow, loss/fast",
        )


@dataclass
class StrategyConfig:
    """How training is distributed (the ``strategy`` group: ddp, deepspeed_zero2, deepspeed_zero3)."""

    name: str = "ddp"  # ddp | deepspeed_zero2 | deepspeed_zero3
    process_group_backend: str | None = None  # None: nccl on GPU, gloo on CPU
    offload_optimizer: bool = False  # DeepSpeed: optimizer state in CPU memory
    offload_parameters: bool = False  # DeepSpeed ZeRO-3: parameters in CPU memory

    def __post_init__(self) -> None:
        known = ("ddp", "deepspeed_zero2", "deepspeed_zero3")
        _check(self.name in known, f"strategy.name must be one of {', '.join(known)}, not {self.name!r}")
        _check(
            self.process_group_backend in (None, "nccl", "gloo"),
            f"strategy.process_group_backend must be nccl or gloo, not {self.process_group_backend!r}",
        )


# ------------------------------------------------------------------------------------------ inference


@dataclass
class SynthesizeConfig:
    """``stage=synthesize``: text, optionally in the voice of a reference clip, to .wav files through the
    inference engine (``s2train.inference.synthesize_stage``). Requests come from ``text``, ``texts`` or a
    JSONL file (``requests``); any combination is spoken, in that order."""

    model: str | None = None  # a pretrain run dir (model.safetensors + model.json) or a released S2 Pro
    # folder; None: run_root/name/pretrain
    codec: str | None = (
        None  # codec.pt, a folder holding it, or a released S2 Pro codec; None: tokenize.codec
    )
    text: str | None = None  # one utterance
    texts: list[str] = field(default_factory=list)  # several utterances
    requests: str | None = None  # JSONL, one request a line: text, and optionally id, reference_audio,
    # reference_text, speaker, seed, max_new_tokens
    reference_audio: str | None = None  # voice cloning for text / texts: a clip (any format, any rate) ...
    reference_text: str | None = None  # ... and its transcript
    speaker: int | None = None  # <|speaker:i|> for texts that carry no speaker tag (default 0)
    reference_dirs: list[str] = field(default_factory=list)  # folders a JSONL request's reference_audio must
    # lie in (after resolving links); empty: the JSONL file's own folder
    max_new_tokens: int = 1024  # frames per utterance at most (the codec's frame rate: 21.5/s for S2 Pro)
    batch_size: int = 8  # requests decoded together (continuous batching)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:<i>
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16
    cuda_graph: bool = True  # on CUDA: replay each frame's step as a CUDA graph
    compile: bool = False  # on a CPU: compile each frame's step (inductor; a minute or two per batch shape)
    prefix_cache_mb: float = 512.0  # keys and values of reference prompts kept for reuse
    threads: int = 0  # torch intra-op threads on a CPU; 0 leaves torch's default
    progress: bool = True

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1, "synthesize.max_new_tokens must be at least 1")
        _check(self.batch_size >= 1, "synthesize.batch_size must be at least 1")
        _check(
            (self.reference_audio is None) == (self.reference_text is None),
            "synthesize.reference_audio and synthesize.reference_text go together: a clip and its transcript",
        )
        _check(self.speaker is None or self.speaker >= 0, "synthesize.speaker cannot be negative")
        _check(
            self.dtype in ("auto", "float32", "bfloat16"),
            f"synthesize.dtype must be auto, float32 or bfloat16, not {self.dtype!r}",
        )
        _check(self.prefix_cache_mb >= 0 and self.threads >= 0, "synthesize.prefix_cache_mb and threads >= 0")


@dataclass
class EvalConfig:
    """``stage=eval``: the Seed-TTS-Eval harness (``eval.stage``). ``mode=seedtts`` reads a meta list and
    scores ``<gen_dir>/<utt>.wav`` of any system, or first generates them with the inference engine (the
    model, codec and sampling of ``synthesize``); ``mode=transcripts`` scores stored ASR outputs
    (``input``: JSONL of utt, lang, ref, hyp). ``profile`` picks the rules: ``official`` (the Seed-TTS-Eval
    scripts), ``f5`` (F5-TTS's harness), ``demo`` (the official text rules with the offline judges)."""

    mode: str = "seedtts"  # seedtts | transcripts
    profile: str = "official"  # official | f5 | demo
    meta: str | None = None  # a Seed-TTS-Eval meta.lst: utt|prompt_text|prompt_wav|target_text[|gt_wav]
    lang: str = "en"  # the meta list's language: en | zh
    test_set: str | None = None  # the published rows to compare with: test-en | test-zh | test-hard;
    # None: test-en or test-zh by lang
    gen_dir: str | None = None  # score this folder of <utt>.wav; None: generate into run_dir/generate/wav
    input: str | None = None  # mode=transcripts: the JSONL file
    limit: int | None = None  # the first N utterances of the meta list only
    ground_truth: bool = True  # also score the gt_wav of 5-field lines, as the ground-truth row
    asr: str = "auto"  # auto (the profile's) | whisper | paraformer | pocketsphinx
    whisper: str | None = None  # a local openai-whisper large-v3 .pt; None: judges.asr.whisper.checkpoint
    paraformer: str | None = None  # a local funasr paraformer-zh folder (the zh extra)
    sim: str = "auto"  # auto (the profile's) | wavlm_ecapa | resemblyzer | speechbrain | none
    sim_checkpoint: str | None = None  # wavlm_ecapa: UniSpeech's wavlm_large_finetune.pth
    speechbrain: str | None = None  # sim=speechbrain: a local ECAPA folder; None: judges.speaker.checkpoint
    dnsmos: bool = True  # DNSMOS (speechmos) of every utterance and its mean
    published: str | None = None  # YAML of other systems' published figures; None: the packaged one
    device: str = "auto"  # auto | cpu | cuda | cuda:<i>, for the ASR and SIM models
    merge_timeout_s: float = 7200.0  # rank 0 waits this long for the other ranks' shares
    progress: bool = True

    def __post_init__(self) -> None:
        _check(
            self.mode in ("seedtts", "transcripts"),
            f"eval.mode must be seedtts or transcripts, not {self.mode!r}",
        )
        _check(
            self.profile in ("official", "f5", "demo"),
            f"eval.profile must be official, f5 or demo, not {self.profile!r}",
        )
        _check(self.lang in ("en", "zh"), f"eval.lang must be en or zh, not {self.lang!r}")
        _check(
            self.test_set in (None, "test-en", "test-zh", "test-hard"),
            f"eval.test_set must be test-en, test-zh or test-hard, not {self.test_set!r}",
        )
        _check(
            self.asr in ("auto", "whisper", "paraformer", "pocketsphinx"),
            f"eval.asr must be auto, whisper, paraformer or pocketsphinx, not {self.asr!r}",
        )
        _check(
            self.sim in ("auto", "wavlm_ecapa", "resemblyzer", "speechbrain", "none"),
            f"eval.sim must be auto, wavlm_ecapa, resemblyzer, speechbrain or none, not {self.sim!r}",
        )
        _check(self.limit is None or self.limit >= 1, "eval.limit must be at least 1")


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
    codec: CodecConfig = field(default_factory=codec_tiny)  # the `codec` group: conf/codec/*.yaml
    codec_train: CodecTrainConfig = field(default_factory=CodecTrainConfig)
    text: TextConfig = field(default_factory=TextConfig)
    lm_data: LMDataConfig = field(default_factory=LMDataConfig)
    model: DualARConfig = field(default_factory=dual_ar_tiny)  # the `model` group: conf/model/*.yaml
    train: LMTrainConfig = field(default_factory=LMTrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)  # the `strategy` group
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    synthesize: SynthesizeConfig = field(default_factory=SynthesizeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # the `eval` group: conf/eval/*.yaml


def register_configs() -> None:
    ConfigStore.instance().store(name="s2train_schema", node=S2Config)
