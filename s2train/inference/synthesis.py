"""Texts (with voices, speakers and seeds) to audio through the inference engine and the codec."""

from __future__ import annotations

from dataclasses import dataclass, field

from s2train.checks import check
from s2train.inference.sampling import SamplingParams


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
        check(self.max_new_tokens >= 1, "synthesize.max_new_tokens must be at least 1")
        check(self.batch_size >= 1, "synthesize.batch_size must be at least 1")
        check(
            (self.reference_audio is None) == (self.reference_text is None),
            "synthesize.reference_audio and synthesize.reference_text go together: a clip and its transcript",
        )
        check(self.speaker is None or self.speaker >= 0, "synthesize.speaker cannot be negative")
        check(
            self.dtype in ("auto", "float32", "bfloat16"),
            f"synthesize.dtype must be auto, float32 or bfloat16, not {self.dtype!r}",
        )
        check(self.prefix_cache_mb >= 0 and self.threads >= 0, "synthesize.prefix_cache_mb and threads >= 0")
