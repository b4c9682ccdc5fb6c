"""``stage=synthesize``: text, optionally in the voice of a reference clip, to .wav files.

Requests come from ``synthesize.text``, ``synthesize.texts`` and a JSONL file (``synthesize.requests``),
one JSON object a line::

    {"text": "Hello there.", "id": "greeting", "reference_audio": "voices/anna.flac",
     "reference_text": "The transcript of the clip.", "speaker": 0, "seed": 3, "max_new_tokens": 600}
    {"text": "Hi [pause] there.", "caption": "A female speaker whispers at a slow pace."}
    {"text": "<|speaker:0|>Are you coming?<|speaker:1|>In a minute.", "id": "dialogue",
     "references": [{"audio": "voices/anna.flac", "text": "..."}, {"audio": "voices/ben.wav", "text": "..."}]}

Only ``text`` is required. Inline tags (``[pause]``, ``[whisper]``, ``[emphasis]``, ...) are part of the
text; ``caption`` (``synthesize.caption`` for ``text`` / ``texts``) says how to speak it, in the system
turn; ``references`` give one voice per speaker of a dialogue, the first for ``<|speaker:0|>``. A reference clip (any format soundfile reads, any rate: it is resampled to the
codec's rate and encoded) clones that voice; its transcript is required with it. ``speaker`` puts
``<|speaker:i|>`` before a text that carries no speaker tag. A JSONL request's ``reference_audio`` is
resolved against the JSONL file's folder and, links resolved, must lie inside ``synthesize.reference_dirs``
(default: the JSONL file's folder); anything else is refused with an error naming the path. The clip of
``synthesize.reference_audio`` (the operator's own argument) applies to ``text`` and ``texts``.

The model is a pretrain run directory (``model.safetensors`` + ``model.json``; default this experiment's
``pretrain`` run) or a released S2 Pro folder; the codec is ``codec.pt`` (``stage=codec``), a folder
holding it, or a released codec (default ``tokenize.codec``); the tokenizer is the ``text`` config's (a
release folder's own ``tokenizer.json`` unless ``text.kind=hf`` names another). Prompts are built by the
prompt builder training uses; generation runs through the synthesis call that evaluation, GRPO and the
server share (``s2train.inference.synthesis``): the engine with continuous batching of
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
from pathlib import Path
from typing import TYPE_CHECKING

from s2train.inference.synthesis import (
    SAFE_ID,
    Synthesizer,
    Utterance,
    resolve_reference,
    speak_to_folder,
    write_manifest,
)
from s2train.runs import jsonl_lines, stage_input
from s2train.text.tokenizer import SPEAKER_TAG, speaker_token

if TYPE_CHECKING:
    from s2train.config import S2Config

REQUEST_KEYS = {
    "text",
    "id",
    "reference_audio",
    "reference_text",
    "references",
    "caption",
    "speaker",
    "seed",
    "max_new_tokens",
}


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
        speaker = row.get("speaker")
        if "speaker" in row and (not isinstance(speaker, int) or isinstance(speaker, bool) or speaker < 0):
            raise ValueError(f'{where}: "speaker" must be a speaker number (0, 1, ...), not {speaker!r}')
        if "speaker" in row and not SPEAKER_TAG.search(text):
            text = speaker_token(int(row["speaker"])) + text
        reference, reference_text = None, row.get("reference_text")
        if "reference_audio" in row:
            reference = resolve_reference(str(row["reference_audio"]), path.parent, allowed, request_id)
        voices = []
        references = row.get("references", [])
        if not isinstance(references, list) or not all(
            isinstance(r, dict) and set(r) == {"audio", "text"} and isinstance(r["text"], str)
            for r in references
        ):
            raise ValueError(
                f'{where}: "references" must be a list of {{"audio": ..., "text": ...}}, one per speaker'
            )
        for r in references:
            voices.append((resolve_reference(str(r["audio"]), path.parent, allowed, request_id), r["text"]))
        if reference is None and voices:  # the first is <|speaker:0|>'s, like reference_audio
            reference, reference_text = voices.pop(0)
        caption = row.get("caption")
        if caption is not None and (not isinstance(caption, str) or not caption.strip()):
            raise ValueError(f'{where}: "caption" must be a non-empty string')
        seed, max_new = row.get("seed"), row.get("max_new_tokens")
        out.append(
            Utterance(
                request_id,
                text,
                reference,
                reference_text,
                None if seed is None else int(seed),
                None if max_new is None else int(max_new),
                caption=caption,
                voices=tuple(voices),
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
    out = [
        Utterance(f"utt-{i:05d}", text, clip, s.reference_text, caption=s.caption)
        for i, text in enumerate(texts)
    ]
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


def run(cfg: S2Config) -> dict:
    """Speak every request into ``run_dir/wav``, then list them all in ``manifest.jsonl``."""
    s = cfg.synthesize
    run_dir = Path(cfg.run_dir)
    utterances = read_requests(cfg)
    # a request without a seed gets one from the run's seed and its place: a rerun draws the same audio
    utterances = [
        u if u.seed is not None else dataclasses.replace(u, seed=cfg.seed * 100_003 + i)
        for i, u in enumerate(utterances)
    ]
    model = stage_input(cfg, "pretrain", s.model)
    synth = Synthesizer.open(s, cfg.text, model, s.codec or cfg.tokenize.codec)
    figures = speak_to_folder(
        synth,
        utterances,
        run_dir / "wav",
        progress=s.progress,
        stream=s.stream,
        first_chunk_frames=s.first_chunk_frames,
        chunk_frames=s.chunk_frames,
    )
    write_manifest(run_dir / "manifest.jsonl", run_dir / "wav", utterances)
    return {
        **figures,
        "device": str(synth.device),
        "dtype": str(next(synth.model.parameters()).dtype).removeprefix("torch."),
        "codec": synth.codec_name,
        "model": str(model),
        "wav_dir": str(run_dir / "wav"),
    }
