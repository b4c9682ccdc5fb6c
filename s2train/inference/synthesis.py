"""Texts, with optional reference voices, speakers and seeds, to audio through the inference engine and
the codec: the one synthesis call of ``stage=synthesize``, ``stage=eval``, GRPO rollouts and the server.

``Synthesizer.open`` loads the model, codec and tokenizer through ``s2train.checkpoints`` and checks that
they belong together; ``Synthesizer.speak`` turns ``Utterance`` s into ``Spoken`` audio with continuous
batching (each reference clip is encoded once and its prompt prefix is shared through the engine's prefix
cache); ``speak_to_folder`` writes ``<id>.wav`` + ``<id>.json`` per utterance atomically and skips the
ones a previous run finished.

    synth = Synthesizer.open(cfg.synthesize, cfg.text, model="runs/demo/pretrain", codec="runs/demo/codec")
    for spoken in synth.speak([Utterance("hello", "Hello there.", seed=3)]):
        spoken.audio  # float32 at synth.sample_rate
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from s2train.audio import SoundFileReader, resample, to_mono
from s2train.checkpoints import open_codec, open_dual_ar
from s2train.checks import check
from s2train.inference.engine import (
    AudioChunk,
    Generation,
    InferenceEngine,
    Request,
    speech_request,
    stream_audio,
)
from s2train.inference.sampling import SamplingParams
from s2train.models.codec import Codec
from s2train.models.dual_ar import DualAR
from s2train.runs import atomic_path, write_json_atomic, write_text_atomic
from s2train.text.prompt import Reference
from s2train.text.tokenizer import TextConfig, TextTokenizer, model_tokenizer

SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")  # an utterance id names its files
ANY_SPEAKER_TAG = re.compile(r"<\|speaker:([^|<>]*)\|>")  # well-formed or not: each must name a speaker


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
    text: str | None = None  # one utterance (inline tags such as [pause] or [whisper] are text)
    texts: list[str] = field(default_factory=list)  # several utterances
    caption: str | None = None  # how text / texts are spoken, e.g. "A female speaker speaks at a slow pace."
    requests: str | None = None  # JSONL, one request a line: text, and optionally id, reference_audio,
    # reference_text, references ([{audio, text}], one per speaker), caption, speaker, seed, max_new_tokens
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
    stream: bool = False  # write each wav as its audio is generated (.<id>.wav.partial until it ends)
    first_chunk_frames: int = 8  # streaming: the first audio after this many frames ...
    chunk_frames: int = 32  # ... then a chunk every this many
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
        check(
            self.first_chunk_frames >= 1 and self.chunk_frames >= 1,
            "synthesize.first_chunk_frames and synthesize.chunk_frames must be at least 1",
        )


@dataclass(frozen=True)
class Utterance:
    """One thing to say: its text (``<|speaker:i|>`` tags allowed), optionally in the voice of a clip."""

    id: str
    text: str
    reference: Path | None = None  # a clip, resolved and checked by the caller
    reference_text: str | None = None
    seed: int | None = None  # None: the engine's own draw
    max_new_tokens: int | None = None  # None: the synthesizer's default
    literal: bool = False  # text from a client: <|...|> written in it is plain text, never a control token
    caption: str | None = None  # how to speak, in the system turn ("A slow, whispery female voice.")
    voices: tuple[tuple[Path, str], ...] = ()  # more (clip, transcript) voices: <|speaker:1|>, 2, ...


@dataclass
class Spoken:
    utterance: Utterance
    audio: np.ndarray  # (samples,) float32 at the codec's rate
    generation: Generation


def resolve_reference(name: str, base: Path, allowed: list[Path], request_id: str) -> Path:
    """``name`` (relative to ``base``) resolved, links followed; it must be a file inside ``allowed``."""
    path = Path(name).expanduser()
    resolved = (path if path.is_absolute() else base / path).resolve()
    if not any(resolved.is_relative_to(folder) for folder in allowed):
        raise ValueError(
            f"request {request_id}: reference_audio {name!r} resolves to {resolved}, which is outside the "
            f"allowed folders {[str(f) for f in allowed]}; move the clip there or add its folder to "
            "synthesize.reference_dirs"
        )
    if not resolved.is_file():
        raise ValueError(f"request {request_id}: reference_audio {resolved} is not a file")
    return resolved


def read_reference(path: Path, codec: Codec) -> torch.Tensor:
    """Codes (K, T) of a clip: decoded, averaged to mono, resampled to the codec's rate, encoded."""
    try:
        reader = SoundFileReader(path)
    except (OSError, RuntimeError, sf.LibsndfileError) as error:
        raise ValueError(f"cannot read the reference clip {path}: {error}") from error
    try:
        samples = to_mono(reader.read(0, reader.frames))
        rate = reader.sample_rate
    finally:
        reader.close()
    if len(samples) == 0:
        raise ValueError(f"the reference clip {path} is empty")
    audio = resample(samples, rate, codec.config.sample_rate)
    weight = next(codec.parameters())
    wav = torch.from_numpy(np.ascontiguousarray(audio)).to(weight.device, weight.dtype)
    return codec.encode(wav, codec.config.sample_rate).cpu()


def device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``auto`` resolved: cuda when available, bfloat16 on CUDA and float32 on a CPU."""
    name = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(name)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"synthesize.device={device} but CUDA is not available")
    dtype = dtype if dtype != "auto" else ("bfloat16" if resolved.type == "cuda" else "float32")
    return resolved, getattr(torch, dtype)


def check_match(model: DualAR, tokenizer: TextTokenizer, codec: Codec) -> None:
    """The model, tokenizer and codec were trained together: the same semantic ids and codebooks."""
    m = model.config
    if (m.semantic_begin_id, m.codebook_size) != (tokenizer.semantic_begin, tokenizer.n_semantic):
        raise ValueError(
            f"the model's semantic tokens start at id {m.semantic_begin_id} ({m.codebook_size} of them) but the "
            f"tokenizer's at {tokenizer.semantic_begin} ({tokenizer.n_semantic}): use the text config the model "
            "was trained with"
        )
    c = codec.config
    if c.n_codebooks < m.num_codebooks or c.semantic_codebook_size != m.codebook_size:
        raise ValueError(
            f"the codec makes {c.n_codebooks} codebooks ({c.semantic_codebook_size} semantic codes) but the "
            f"model expects {m.num_codebooks} ({m.codebook_size}): use the codec the model was trained on"
        )


class Synthesizer:
    """A model, its codec and tokenizer, and an engine over them."""

    def __init__(
        self,
        model: DualAR,
        codec: Codec,
        tokenizer: TextTokenizer,
        *,
        sampling: SamplingParams | None = None,
        max_new_tokens: int = 1024,
        batch_size: int = 8,
        prefix_cache_mb: float = 512.0,
        system_turn: bool = True,
        cuda_graph: bool = False,
        compile: bool = False,
    ):
        check_match(model, tokenizer, codec)
        self.model, self.codec, self.tokenizer = model, codec, tokenizer
        self.sampling = sampling or SamplingParams()
        self.max_new_tokens, self.batch_size, self.system_turn = max_new_tokens, batch_size, system_turn
        self.engine = InferenceEngine(
            model,
            tokenizer.token_id("<|im_end|>"),
            max_batch=batch_size,
            prefix_cache_mb=prefix_cache_mb,
            cuda_graph=cuda_graph,
            compile=compile,
        )
        self.codec_name = self.model_name = ""  # what Synthesizer.open loaded, for reports
        self.references: dict[tuple[Path, str], Reference] = {}  # each clip is encoded once
        self.reference_s = 0.0  # time spent encoding reference clips

    @classmethod
    def open(
        cls, s: SynthesizeConfig, text: TextConfig, model: str | Path, codec: str | Path | None
    ) -> Synthesizer:
        """The synthesizer of ``s`` (device, dtype, engine settings) over the model and codec at these paths
        (``s2train.checkpoints`` formats); a released model folder brings its own tokenizer unless
        ``text.kind=hf`` names another."""
        if s.threads:
            torch.set_num_threads(s.threads)
        device, dtype = device_and_dtype(s.device, s.dtype)
        if not codec:
            raise ValueError(
                "synthesize.codec is required: the codec.pt of stage=codec, or a released S2 Pro codec folder"
            )
        the_codec, codec_name = open_codec(codec, key="synthesize.codec")
        the_codec = the_codec.to(device).eval()
        the_model, release = open_dual_ar(
            model, device=device, dtype=dtype, residual_codebook_size=the_codec.config.codebook_size
        )
        tokenizer = model_tokenizer(release, text)
        synth = cls(
            the_model,
            the_codec,
            tokenizer,
            sampling=s.sampling,
            max_new_tokens=s.max_new_tokens,
            batch_size=s.batch_size,
            prefix_cache_mb=s.prefix_cache_mb,
            system_turn=text.system_turn,
            cuda_graph=s.cuda_graph and device.type == "cuda",
            compile=s.compile and device.type == "cpu",
        )
        synth.codec_name, synth.model_name = codec_name, str(model)
        return synth

    @property
    def sample_rate(self) -> int:
        return self.codec.config.sample_rate

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def request(self, u: Utterance) -> Request:
        """The engine request of ``u``: its prompt, built by the prompt builder training uses."""
        for tag in () if u.literal else ANY_SPEAKER_TAG.finditer(u.text):
            if not tag.group(1).isdigit() or int(tag.group(1)) >= self.tokenizer.n_speakers:
                raise ValueError(
                    f"request {u.id}: {tag.group(0)} is not a speaker of this model; its tokenizer has "
                    f"<|speaker:0|> to <|speaker:{self.tokenizer.n_speakers - 1}|>"
                )
        voices = []
        clips = ([(u.reference, u.reference_text or "")] if u.reference is not None else []) + list(u.voices)
        if len(clips) > self.tokenizer.n_speakers:
            raise ValueError(
                f"request {u.id}: {len(clips)} reference voices, but the model has only "
                f"{self.tokenizer.n_speakers} speaker tokens"
            )
        for key in clips:
            if key not in self.references:
                started = time.perf_counter()
                self.references[key] = Reference(key[1], read_reference(key[0], self.codec))
                self.reference_s += time.perf_counter() - started
            voices.append(self.references[key])
        r = speech_request(
            self.tokenizer,
            u.text,
            self.model.config.num_codebooks,
            references=voices,
            system_turn=self.system_turn,
            literal=u.literal,
            caption=u.caption,
            max_new_tokens=u.max_new_tokens or self.max_new_tokens,
            sampling=self.sampling,
            seed=u.seed,
        )
        limit = self.model.config.max_seq_len
        if r.prompt.shape[1] + r.max_new_tokens > limit:
            raise ValueError(
                f"request {u.id}: its {r.prompt.shape[1]}-position prompt (reference included) plus "
                f"max_new_tokens={r.max_new_tokens} exceeds the model's max_seq_len {limit}; "
                "use a shorter reference clip or fewer frames"
            )
        return r

    @torch.no_grad()
    def decode(self, generation: Generation) -> np.ndarray:
        """The audio of a generation's codes (empty when it ended at once)."""
        codes = generation.codes
        if not codes.shape[1]:
            return np.zeros(0, dtype=np.float32)
        return self.codec.decode(codes.to(next(self.codec.parameters()).device))[0, 0].float().cpu().numpy()

    def _parts(self, utterances: Sequence[Utterance]) -> Iterator[tuple[Sequence[Utterance], list[Request]]]:
        """The utterances ``4 x batch_size`` at a time with their requests, so that memory stays bounded
        however many there are."""
        chunk = self.batch_size * 4
        for start in range(0, len(utterances), chunk):
            part = utterances[start : start + chunk]
            yield part, [self.request(u) for u in part]

    def speak(self, utterances: Sequence[Utterance]) -> Iterator[Spoken]:
        """Every utterance spoken, in the order they finish (prompts built part by part: ``_parts``)."""
        for part, requests in self._parts(utterances):
            for step in self.engine.run(requests):
                if step.done is not None:
                    yield Spoken(part[step.index], self.decode(step.done), step.done)

    def stream(
        self, utterances: Sequence[Utterance], first_chunk_frames: int = 8, chunk_frames: int = 32
    ) -> Iterator[tuple[Utterance, AudioChunk]]:
        """Every utterance's audio as it is generated (``stream_audio``): its first chunk after
        ``first_chunk_frames`` frames, then every ``chunk_frames``; the last chunk carries the generation.
        The chunks of an utterance joined are the audio ``speak`` gives it (to rounding)."""
        for part, requests in self._parts(utterances):
            for audio in stream_audio(
                self.engine,
                self.codec,
                requests,
                first_chunk_frames=first_chunk_frames,
                chunk_frames=chunk_frames,
            ):
                yield part[audio.index], audio


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    with atomic_path(path) as tmp:
        sf.write(tmp, np.clip(audio, -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16")


def is_done(wav_dir: Path, u: Utterance) -> bool:
    return (wav_dir / f"{u.id}.wav").is_file() and (wav_dir / f"{u.id}.json").is_file()


def speak_to_folder(
    synth: Synthesizer,
    utterances: Sequence[Utterance],
    wav_dir: Path,
    *,
    progress: bool = True,
    stream: bool = False,
    first_chunk_frames: int = 8,
    chunk_frames: int = 32,
) -> dict:
    """Speak the utterances not yet in ``wav_dir`` into ``<id>.wav`` (16-bit PCM) and ``<id>.json`` (text,
    frames, seconds, whether it ended on ``<|im_end|>``, reference, seed), each written atomically, the json
    last, so a rerun skips exactly the finished ones. Returns the figures of this call.

    ``stream``: each utterance's audio is written as it is generated, chunk by chunk
    (``Synthesizer.stream``), into ``.<id>.wav.partial``, renamed to ``<id>.wav`` when it ends; the
    json records its time to first audio."""
    wav_dir.mkdir(parents=True, exist_ok=True)
    for u in utterances:
        check(bool(SAFE_ID.match(u.id)), f"utterance id {u.id!r} must be 1-128 letters, digits, '_' or '-'")
    todo = [u for u in utterances if not is_done(wav_dir, u)]
    for u in todo:  # every request is checked (and its reference clip read) before any is spoken
        synth.request(u)
    frames = stopped = 0
    audio_s = 0.0
    reference_before, started = synth.reference_s, time.perf_counter()
    bar = tqdm(total=len(todo), desc="synthesize", unit="utt", disable=not progress)
    first_audio: list[float] = []
    finished = (
        _stream_to_folder(synth, todo, wav_dir, first_chunk_frames, chunk_frames, first_audio)
        if stream
        else (_write(wav_dir, spoken, synth.sample_rate) for spoken in synth.speak(todo))
    )
    for seconds, generation in finished:
        audio_s += seconds
        frames += generation.codes.shape[1]
        stopped += int(generation.stopped)
        bar.update(1)
    bar.close()
    synthesis_s = time.perf_counter() - started - (synth.reference_s - reference_before)
    return {
        "utterances": len(utterances),
        "synthesized": len(todo),
        "skipped_done": len(utterances) - len(todo),
        "frames": frames,
        "audio_s": round(audio_s, 3),
        "synthesis_s": round(synthesis_s, 3),  # generation and decoding, without loading or references
        "frames_per_s": round(frames / synthesis_s, 2) if todo and synthesis_s else 0.0,
        "real_time_factor": round(synthesis_s / audio_s, 4) if audio_s else 0.0,
        "ended_on_im_end": stopped,
        "prefix_cache_hits": synth.engine.prefix_cache.hits,
        **({"first_audio_s_mean": round(float(np.mean(first_audio)), 4)} if first_audio else {}),
    }


def write_manifest(path: Path, wav_dir: Path, utterances: Sequence[Utterance]) -> None:
    """A JSONL of the ``<id>.json`` records of ``utterances`` (all spoken), in their order."""
    rows = [(wav_dir / f"{u.id}.json").read_text(encoding="utf-8") for u in utterances]
    write_text_atomic(path, "".join(json.dumps(json.loads(r), ensure_ascii=False) + "\n" for r in rows))


def _stream_to_folder(
    synth: Synthesizer,
    todo: Sequence[Utterance],
    wav_dir: Path,
    first_chunk_frames: int,
    chunk_frames: int,
    first_audio: list[float],
) -> Iterator[tuple[float, Generation]]:
    """``speak_to_folder(stream=True)``: chunks appended to ``.<id>.wav.partial`` as they come."""
    for stale in wav_dir.glob(".*.wav.partial"):  # a killed run's unfinished files
        stale.unlink()
    rate, started = synth.sample_rate, time.perf_counter()
    files: dict[str, tuple[sf.SoundFile, Path]] = {}
    try:
        for u, chunk in synth.stream(todo, first_chunk_frames, chunk_frames):
            if u.id not in files:
                partial = wav_dir / f".{u.id}.wav.partial"
                files[u.id] = (sf.SoundFile(partial, "w", rate, 1, "PCM_16", format="WAV"), partial)
                first_audio.append(time.perf_counter() - started)
            file, partial = files[u.id]
            file.write(np.clip(chunk.audio.numpy(), -1.0, 1.0))
            file.flush()
            if chunk.final:
                seconds = file.frames / rate
                file.close()
                del files[u.id]
                partial.replace(wav_dir / f"{u.id}.wav")
                _write_meta(wav_dir, u, chunk.generation, seconds, rate, first_audio[-1])
                yield seconds, chunk.generation
    finally:
        for file, _ in files.values():
            file.close()


def _write(wav_dir: Path, spoken: Spoken, rate: int) -> tuple[float, Generation]:
    """Write ``<id>.wav`` then ``<id>.json``; returns the seconds of audio and the generation."""
    write_wav(wav_dir / f"{spoken.utterance.id}.wav", spoken.audio, rate)
    seconds = len(spoken.audio) / rate
    _write_meta(wav_dir, spoken.utterance, spoken.generation, seconds, rate)
    return seconds, spoken.generation


def _write_meta(
    wav_dir: Path,
    u: Utterance,
    generation: Generation,
    seconds: float,
    rate: int,
    first_audio_s: float | None = None,
) -> None:
    meta = {
        "id": u.id,
        "text": u.text,
        "wav": f"wav/{u.id}.wav",
        "frames": int(generation.codes.shape[1]),
        "seconds": round(seconds, 3),
        "sample_rate": rate,
        "ended_on_im_end": generation.stopped,
        "reference_audio": str(u.reference) if u.reference else None,
        "reference_text": u.reference_text,
        "references": [{"audio": str(a), "text": t} for a, t in u.voices] or None,
        "caption": u.caption,
        "prefix_cache_hit": generation.prefix_hit,
        "seed": u.seed,
    }
    if first_audio_s is not None:
        meta["first_audio_s"] = round(first_audio_s, 4)  # from the run's start (streamed)
    write_json_atomic(wav_dir / f"{u.id}.json", meta)
