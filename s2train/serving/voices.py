"""The server's voice registry: reference clips and their transcripts, in a folder the server owns.

A voice is ``<id>.wav`` (the uploaded clip decoded, checked and rewritten as 16-bit mono PCM at its own
rate) and ``<id>.json`` (its transcript and facts), both written atomically. Ids are 1-64 letters,
digits, ``_`` or ``-`` (starting with a letter or digit), so a name never leaves the folder; paths are
built from ids only, and resolved paths are checked to lie inside it all the same. Uploads are limited in
bytes and seconds and must decode as audio.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from s2train.audio import to_mono
from s2train.runs import atomic_path, write_json_atomic

VOICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
DEFAULT_VOICE = "default"  # no reference clip: the model's own voice


class VoiceError(ValueError):
    """A request about voices the registry refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class VoiceRegistry:
    """Voices in ``folder`` (module docstring)."""

    def __init__(
        self,
        folder: Path,
        *,
        max_bytes: int = 10 * 2**20,
        max_seconds: float = 30.0,
        min_seconds: float = 0.5,
    ):
        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.max_seconds, self.min_seconds = max_bytes, max_seconds, min_seconds
        self._lock = threading.Lock()

    def _paths(self, voice_id: str) -> tuple[Path, Path]:
        if not isinstance(voice_id, str) or not VOICE_ID.match(voice_id) or voice_id == DEFAULT_VOICE:
            raise VoiceError(
                f"voice id {voice_id!r} is not valid: 1-64 letters, digits, '_' or '-', starting with a letter "
                f"or digit, and not {DEFAULT_VOICE!r}"
            )
        wav, meta = self.folder / f"{voice_id}.wav", self.folder / f"{voice_id}.json"
        if wav.resolve().parent != self.folder or meta.resolve().parent != self.folder:
            raise VoiceError(f"voice id {voice_id!r} does not name a file of the voice folder")
        return wav, meta

    def add(self, voice_id: str, data: bytes, text: str) -> dict:
        """Register ``data`` (an audio file's bytes) with its transcript ``text`` as ``voice_id``."""
        wav, meta = self._paths(voice_id)
        if not isinstance(text, str) or not text.strip():
            raise VoiceError("a voice needs the transcript of its clip (text)")
        if len(text) > 2000:
            raise VoiceError(f"the transcript is {len(text)} characters; at most 2000")
        if len(data) > self.max_bytes:
            raise VoiceError(f"the clip is {len(data)} bytes; at most {self.max_bytes}", status=413)
        try:
            samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as error:
            raise VoiceError(f"the upload is not an audio file soundfile can read ({error})") from error
        audio = to_mono(samples)
        seconds = len(audio) / rate
        if not np.isfinite(audio).all():
            raise VoiceError("the clip has NaN or infinite samples")
        if not self.min_seconds <= seconds <= self.max_seconds:
            raise VoiceError(
                f"the clip is {seconds:.2f} s long; a voice needs {self.min_seconds:g} to {self.max_seconds:g} s"
            )
        with self._lock:
            if meta.exists():
                raise VoiceError(f"voice {voice_id!r} exists already: delete it first", status=409)
            with atomic_path(wav) as tmp:
                sf.write(tmp, np.clip(audio, -1, 1), rate, subtype="PCM_16", format="WAV")
            info = {
                "id": voice_id,
                "text": text.strip(),
                "seconds": round(seconds, 3),
                "sample_rate": rate,
                "created": int(time.time()),
            }
            write_json_atomic(meta, info)
        return info

    def get(self, voice_id: str) -> tuple[Path, str]:
        """The clip and transcript of ``voice_id``; VoiceError (404) if there is none."""
        wav, meta = self._paths(voice_id)
        if not meta.is_file() or not wav.is_file():
            raise VoiceError(f"there is no voice {voice_id!r}; GET /v1/voices lists them", status=404)
        return wav, json.loads(meta.read_text(encoding="utf-8"))["text"]

    def list(self) -> list[dict]:
        out = []
        for meta in sorted(self.folder.glob("*.json")):
            if VOICE_ID.match(meta.stem) and (self.folder / f"{meta.stem}.wav").is_file():
                out.append(json.loads(meta.read_text(encoding="utf-8")))
        return out

    def delete(self, voice_id: str) -> Path:
        """Remove ``voice_id``; returns the clip's path it had (the synthesizer forgets its codes)."""
        wav, meta = self._paths(voice_id)
        with self._lock:
            if not meta.is_file():
                raise VoiceError(f"there is no voice {voice_id!r}", status=404)
            meta.unlink()
            wav.unlink(missing_ok=True)
        return wav
