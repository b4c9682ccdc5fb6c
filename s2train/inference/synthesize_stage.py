"""``stage=synthesize``: text, optionally in the voice of a reference clip, to .wav files.

Requests come from ``synthesize.text``, ``synthesize.texts`` and a JSONL file (``synthesize.requests``),
one JSON object a line::

    {"text": "Hello there.", "id": "greeting", "reference_audio": "voices/anna.flac",
     "reference_text": "The transcript of the clip.", "speaker": 0, "seed": 3, "max_new_tokens": 600}

Only ``text`` is required. A reference clip (any format soundfile reads, any rate: it is resampled to the
codec's rate and encoded) clones that voice; its transcript is required with it. ``speaker`` puts
``<|speaker:i|>`` before a text that carries no speaker tag. A JSONL request's ``reference_audio`` is
resolved against the JSONL file's folder and, links resolved, must lie inside ``synthesize.reference_dirs``
(default: the JSONL file's folder); anything else is refused with an error naming the path. The clip of
``synthesize.reference_audio`` (the operator's own argument) applies to ``text`` and ``texts``.

The model is a pretrain run directory (``model.safetensors`` + ``model.json``; default this experiment's
``pretrain`` run) or a released S2 Pro folder; the codec is ``codec.pt`` (``stage=codec``), a folder
holding it, or a released codec (default ``tokenize.codec``); the tokenizer is the ``text`` config's (a
release folder's own ``tokenizer.json`` unless ``text.kind=hf`` names another). Prompts are built by the
prompt builder training uses; generation runs through ``InferenceEngine`` with continuous batching of
``synthesize.batch_size`` requests, the prefix cache sharing each reference voice's prompt.

Outputs, in the run directory: ``wav/<id>.wav`` (16-bit PCM at the codec's rate) and ``wav/<id>.json``
(text, frames, seconds, whether it ended on ``<|im_end|>``, reference, seed), both written atomically,
so a rerun skips the requests that are done; ``manifest.jsonl`` of all requests.

    python -m s2train stage=synthesize name=demo synthesize.text="Hello world."
    python -m s2train stage=synthesize name=demo synthesize.requests=prompts/requests.jsonl
    python -m s2train stage=synthesize synthesize.model=/models/s2-pro synthesize.codec=/models/s2-pro \\
        synthesize.text="Hello." synthesize.reference_audio=me.wav \\
        synthesize.reference_text="What I say in the clip."                                  # one GPU
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from data_pipeline.tokenize import open_codec
from s2train.audio import SoundFileReader, resample, to_mono
from s2train.compat.fish_dual_ar import load_fish_dual_ar
from s2train.inference.engine import Generation, InferenceEngine, Request, speech_request
from s2train.models.codec import Codec
from s2train.models.dual_ar import DualAR, DualARConfig
from s2train.runs import atomic_path, jsonl_lines, write_json_atomic, write_text_atomic
from s2train.text.prompt import Reference
from s2train.text.tokenizer import SPEAKER_TAG, HFTokenizer, TextTokenizer, load_tokenizer, speaker_token

if TYPE_CHECKING:
    from s2train.config import S2Config

SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
REQUEST_KEYS = {"text", "id", "reference_audio", "reference_text", "speaker", "seed", "max_new_tokens"}


@dataclass(frozen=True)
class Utterance:
    """One request of the stage, before its prompt is built."""

    id: str
    text: str
    reference: Path | None = None  # a clip, resolved and checked
    reference_text: str | None = None
    seed: int | None = None  # None: derived from the run's seed and the request's place
    max_new_tokens: int | None = None  # None: synthesize.max_new_tokens


# -------------------------------------------------------------------------------------------- loading


def open_dual_ar(
    spec: str | Path, *, device: torch.device, dtype: torch.dtype, residual_codebook_size: int | None = None
) -> tuple[DualAR, Path | None]:
    """The model of a pretrain run directory (``model.json`` + ``model.safetensors``), or of a released S2
    Pro folder; returns it in eval mode and, for a release, the folder whose tokenizer goes with it."""
    folder = Path(spec)
    if (folder / "model.json").is_file():
        if not (folder / "model.safetensors").is_file():
            raise ValueError(f"{folder} has model.json but no model.safetensors")
        model = DualAR(DualARConfig(**json.loads((folder / "model.json").read_text(encoding="utf-8"))))
        model.load_state_dict(load_file(folder / "model.safetensors"))
        return model.to(device=device, dtype=dtype).eval(), None
    if (folder / "config.json").is_file():
        model, _ = load_fish_dual_ar(
            folder, dtype=dtype, device=device, residual_codebook_size=residual_codebook_size
        )
        return model, folder
    raise ValueError(
        f"synthesize.model={spec} holds neither model.json + model.safetensors (a pretrain run) nor "
        "config.json (a released S2 Pro folder)"
    )


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


def read_jsonl_requests(path: Path, allowed: list[Path]) -> list[Utterance]:
    """The requests of a JSONL file; reference clips resolved against its folder and checked."""
    out = []
    for line_no, where, row in jsonl_lines(path):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise ValueError(f'{where} needs a non-empty "text"')
        unknown = set(row) - REQUEST_KEYS
        if unknown:
            raise ValueError(
                f"{where} has unknown keys {sorted(unknown)}; the keys are {sorted(REQUEST_KEYS)}"
            )
        if ("reference_audio" in row) != ("reference_text" in row):
            raise ValueError(f"{where}: reference_audio and reference_text go together")
        request_id = str(row.get("id", f"line-{line_no:05d}"))
        text = row["text"]
        if "speaker" in row and not SPEAKER_TAG.search(text):
            text = speaker_token(int(row["speaker"])) + text
        reference = None
        if "reference_audio" in row:
            reference = resolve_reference(str(row["reference_audio"]), path.parent, allowed, request_id)
        seed, max_new = row.get("seed"), row.get("max_new_tokens")
        out.append(
            Utterance(
                request_id,
                text,
                reference,
                row.get("reference_text"),
                None if seed is None else int(seed),
                None if max_new is None else int(max_new),
            )
        )
    return out


def read_requests(cfg: S2Config) -> list[Utterance]:
    """Every request of the stage, in order: ``text``, ``texts``, then the JSONL lines."""
    s = cfg.synthesize
    clip = None
    if s.reference_audio:
        clip = Path(s.reference_audio).expanduser().resolve()
        if not clip.is_file():
            raise ValueError(f"synthesize.reference_audio={s.reference_audio} is not a file")
    texts = ([s.text] if s.text else []) + list(s.texts)
    out = [Utterance(f"utt-{i:05d}", text, clip, s.reference_text) for i, text in enumerate(texts)]
    if s.requests:
        jsonl = Path(s.requests).expanduser().resolve()
        if not jsonl.is_file():
            raise ValueError(f"synthesize.requests={s.requests} is not a file")
        allowed = [Path(d).expanduser().resolve() for d in s.reference_dirs] or [jsonl.parent]
        out += read_jsonl_requests(jsonl, allowed)
    if not out:
        raise ValueError(
            "nothing to say: give synthesize.text, synthesize.texts or synthesize.requests (JSONL)"
        )
    if s.speaker is not None:
        tag = speaker_token(s.speaker)
        out = [u if SPEAKER_TAG.search(u.text) else dataclasses.replace(u, text=tag + u.text) for u in out]
    seen: set[str] = set()
    for u in out:
        if not SAFE_ID.match(u.id):
            raise ValueError(
                f"request id {u.id!r} must be 1-128 letters, digits, '_' or '-' (it names files)"
            )
        if u.id in seen:
            raise ValueError(f"request ids must be unique; {u.id!r} is repeated")
        seen.add(u.id)
        if u.max_new_tokens is not None and u.max_new_tokens < 1:
            raise ValueError(f"request {u.id}: max_new_tokens must be at least 1")
    return out


# ---------------------------------------------------------------------------------------------- stage


def _device_and_dtype(cfg: S2Config) -> tuple[torch.device, torch.dtype]:
    s = cfg.synthesize
    name = s.device if s.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"synthesize.device={s.device} but CUDA is not available")
    dtype = s.dtype if s.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    return device, getattr(torch, dtype)


def _tokenizer(cfg: S2Config, release: Path | None) -> TextTokenizer:
    if release is not None and cfg.text.kind != "hf":
        return HFTokenizer(release)
    return load_tokenizer(cfg.text)


def _check_match(model: DualAR, tokenizer: TextTokenizer, codec: Codec) -> None:
    m = model.config
    if (m.semantic_begin_id, m.codebook_size) != (tokenizer.semantic_begin, tokenizer.n_semantic):
        raise ValueError(
            f"the model's semantic tokens start at id {m.semantic_begin_id} ({m.codebook_size} of them) but the "
            f"tokenizer's at {tokenizer.semantic_begin} ({tokenizer.n_semantic}): use the text config the model "
            "was trained with"
        )
    c = codec.config
    if (c.n_codebooks, c.semantic_codebook_size) != (m.num_codebooks, m.codebook_size):
        raise ValueError(
            f"the codec makes {c.n_codebooks} codebooks ({c.semantic_codebook_size} semantic codes) but the "
            f"model expects {m.num_codebooks} ({m.codebook_size}): use the codec the model was trained on"
        )


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    with atomic_path(path) as tmp:
        sf.write(tmp, np.clip(audio, -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16")


def run(cfg: S2Config, manifest: str = "manifest.jsonl") -> dict:
    """Speak every request into ``run_dir/wav``; ``manifest`` names the JSONL of this call's requests."""
    s = cfg.synthesize
    run_dir = Path(cfg.run_dir)
    wav_dir = run_dir / "wav"
    wav_dir.mkdir(parents=True, exist_ok=True)
    if s.threads:
        torch.set_num_threads(s.threads)
    utterances = read_requests(cfg)
    device, dtype = _device_and_dtype(cfg)

    if not (s.codec or cfg.tokenize.codec):
        raise ValueError(
            "synthesize.codec is required: the codec.pt of stage=codec, or a released S2 Pro codec folder"
        )
    codec, codec_name = open_codec(s.codec or cfg.tokenize.codec)
    codec = codec.to(device).eval()
    model_spec = s.model or str(Path(cfg.run_root) / cfg.name / "pretrain")
    model, release = open_dual_ar(
        model_spec, device=device, dtype=dtype, residual_codebook_size=codec.config.codebook_size
    )
    tokenizer = _tokenizer(cfg, release)
    _check_match(model, tokenizer, codec)
    engine = InferenceEngine(
        model,
        tokenizer.token_id("<|im_end|>"),
        max_batch=s.batch_size,
        prefix_cache_mb=s.prefix_cache_mb,
        cuda_graph=s.cuda_graph and device.type == "cuda",
        compile=s.compile and device.type == "cpu",
    )

    def done(u: Utterance) -> bool:
        return (wav_dir / f"{u.id}.wav").is_file() and (wav_dir / f"{u.id}.json").is_file()

    todo = [(i, u) for i, u in enumerate(utterances) if not done(u)]
    references: dict[tuple[Path, str], Reference] = {}  # each clip is encoded once

    def request(index: int, u: Utterance) -> Request:
        voices = []
        if u.reference is not None:
            key = (u.reference, u.reference_text or "")
            if key not in references:
                references[key] = Reference(key[1], read_reference(u.reference, codec))
            voices.append(references[key])
        seed = u.seed if u.seed is not None else cfg.seed * 100_003 + index
        r = speech_request(
            tokenizer,
            u.text,
            model.config.num_codebooks,
            references=voices,
            system_turn=cfg.text.system_turn,
            max_new_tokens=u.max_new_tokens or s.max_new_tokens,
            sampling=s.sampling,
            seed=seed,
        )
        if r.prompt.shape[1] + r.max_new_tokens > model.config.max_seq_len:
            raise ValueError(
                f"request {u.id}: its {r.prompt.shape[1]}-position prompt (reference included) plus "
                f"max_new_tokens={r.max_new_tokens} exceeds the model's max_seq_len {model.config.max_seq_len}; "
                "use a shorter reference clip or fewer frames"
            )
        return r

    frames = stopped = 0
    audio_s = synthesis_s = 0.0
    chunk = s.batch_size * 4  # requests whose prompts are built at a time: memory stays bounded
    bar = tqdm(total=len(todo), desc="synthesize", unit="utt", disable=not s.progress)
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        requests = [request(i, u) for i, u in part]  # reference clips encoded here, not timed
        started = time.perf_counter()
        for step in engine.run(requests):
            if step.done is not None:
                u = part[step.index][1]
                audio_s += _write(wav_dir, u, step.done, codec, requests[step.index].seed)
                frames += step.done.codes.shape[1]
                stopped += int(step.done.stopped)
                bar.update(1)
        synthesis_s += time.perf_counter() - started
    bar.close()

    rows = [json.loads((wav_dir / f"{u.id}.json").read_text(encoding="utf-8")) for u in utterances]
    write_text_atomic(run_dir / manifest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {
        "utterances": len(utterances),
        "synthesized": len(todo),
        "skipped_done": len(utterances) - len(todo),
        "frames": frames,
        "audio_s": round(audio_s, 3),
        "synthesis_s": round(synthesis_s, 3),  # generation and decoding, without model loading
        "frames_per_s": round(frames / synthesis_s, 2) if synthesis_s else 0.0,
        "real_time_factor": round(synthesis_s / audio_s, 4) if audio_s else 0.0,
        "ended_on_im_end": stopped,
        "prefix_cache_hits": engine.prefix_cache.hits,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "codec": codec_name,
        "model": model_spec,
        "wav_dir": str(wav_dir),
    }


@torch.no_grad()
def _write(wav_dir: Path, u: Utterance, generation: Generation, codec: Codec, seed: int | None) -> float:
    """Decode one generation, write ``<id>.wav`` then ``<id>.json``; returns its seconds of audio."""
    codes = generation.codes
    rate = codec.config.sample_rate
    if codes.shape[1]:
        audio = codec.decode(codes.to(next(codec.parameters()).device))[0, 0].float().cpu().numpy()
    else:
        audio = np.zeros(0, dtype=np.float32)
    write_wav(wav_dir / f"{u.id}.wav", audio, rate)
    seconds = len(audio) / rate
    meta = {
        "id": u.id,
        "text": u.text,
        "wav": f"wav/{u.id}.wav",
        "frames": int(codes.shape[1]),
        "seconds": round(seconds, 3),
        "sample_rate": rate,
        "ended_on_im_end": generation.stopped,
        "reference_audio": str(u.reference) if u.reference else None,
        "reference_text": u.reference_text,
        "prefix_cache_hit": generation.prefix_hit,
        "seed": seed,
    }
    write_json_atomic(wav_dir / f"{u.id}.json", meta)
    return seconds
