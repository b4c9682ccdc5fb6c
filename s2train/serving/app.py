"""The OpenAI-compatible speech server: FastAPI over the live engine, the voice registry and a web page.

Endpoints (errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx
status for anything the client can fix):

- ``POST /v1/audio/speech``: OpenAI's audio speech API. ``model``, ``input``, ``voice`` (``default``: the
  model's own voice, or a registered voice id), ``response_format`` (``wav``, ``pcm``, ``flac``, ``mp3``),
  ``speed`` (0.25 to 4, a time stretch of the audio), ``instructions`` (how to speak: our caption),
  ``stream_format`` (``audio``: the bytes as they are made; ``sse``: ``speech.audio.delta`` events of
  base64 16-bit PCM, then ``speech.audio.done``). Extensions: ``seed``, ``caption``, ``max_new_tokens``,
  ``temperature``, ``top_p``, ``top_k``, ``fast_temperature``, ``fast_top_p``, ``fast_top_k``. ``wav`` and
  ``pcm`` stream as the frames are decoded (``speed`` 1); ``flac`` and ``mp3`` come whole. The input is
  plain text: ``<|...|>`` written in it is spoken as text, never read as a control token.
- ``GET /v1/models``; ``GET /v1/voices``, ``POST /v1/voices`` (multipart: ``id``, ``text``, ``file``),
  ``DELETE /v1/voices/{id}``; ``GET /health``; ``GET /metrics`` (Prometheus text); ``GET /``: the page.

Every ``/v1`` call needs ``Authorization: Bearer <key>`` when the server has an API key. A POST must say
its ``Content-Length`` (411 otherwise) and stay under the limits (413). A full queue answers 429 with
``Retry-After``; a server shutting down, 503.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import io
import json
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile as sf
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from s2train.inference.engine import AudioChunk
from s2train.inference.sampling import SamplingParams
from s2train.inference.synthesis import Synthesizer, Utterance
from s2train.serving.live import Closed, Finished, LiveEngine, QueueFull
from s2train.serving.voices import DEFAULT_VOICE, VoiceError, VoiceRegistry

STATIC = Path(__file__).resolve().parent / "static"
OPENAI_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")  # names OpenAI clients send: this model
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "fast_temperature", "fast_top_p", "fast_top_k")


@dataclass
class ServeSettings:
    """The limits and names of a running server (``ServeConfig`` holds them in the config)."""

    model_name: str = "s2train"
    api_key: str | None = None
    max_text_chars: int = 4096
    max_body_bytes: int = 64 * 1024
    max_upload_bytes: int = 10 * 2**20
    max_new_tokens: int = 1024


class SpeechBody(BaseModel):
    """The JSON body of ``POST /v1/audio/speech``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    input: str
    voice: str | dict[str, str] = DEFAULT_VOICE
    response_format: Literal["wav", "pcm", "flac", "mp3"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"
    instructions: str | None = None
    caption: str | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    fast_temperature: float | None = None
    fast_top_p: float | None = None
    fast_top_k: int | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None, **headers):
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers or None)


# -------------------------------------------------------------------------------------------- audio


def pcm16(audio: np.ndarray) -> bytes:
    """Float audio as 16-bit little-endian PCM."""
    return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def wav_header(sample_rate: int) -> bytes:
    """A 16-bit mono WAV header for a stream of unknown length (sizes 0xFFFFFFFF, as streaming servers
    write it; players read to the end)."""
    unknown = 0xFFFFFFFF
    return (
        b"RIFF"
        + struct.pack("<I", unknown)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", unknown)
    )


def encode(audio: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """The whole clip in ``fmt``."""
    if fmt == "pcm":
        return pcm16(audio)
    buffer = io.BytesIO()
    subtype = "PCM_16" if fmt == "wav" else None  # flac's and mp3's own defaults
    sf.write(buffer, np.clip(audio, -1, 1), sample_rate, format=fmt.upper(), subtype=subtype)
    return buffer.getvalue()


def stretch(audio: np.ndarray, speed: float) -> np.ndarray:
    """``audio`` played ``speed`` times faster at the same pitch (librosa's phase vocoder)."""
    if speed == 1.0 or len(audio) < 2048:
        return audio
    import librosa

    return librosa.effects.time_stretch(audio.astype(np.float32), rate=speed).astype(np.float32)


MEDIA = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg"}


# ---------------------------------------------------------------------------------------------- app


def create_app(
    synth: Synthesizer, live: LiveEngine, voices: VoiceRegistry, settings: ServeSettings
) -> FastAPI:
    """The server's FastAPI app (module docstring)."""
    app = FastAPI(title="s2train speech server", docs_url="/docs", redoc_url=None)
    app.state.synth, app.state.live, app.state.voices, app.state.settings = synth, live, voices, settings
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        extra = {"Retry-After": "1"} if error.status == 429 else {}
        return error_response(error.status, error.message, error.param, error.code, **extra)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException):
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError):
        return error_response(400, _describe(error.errors()))

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        """Body limits by Content-Length (before any byte is read) and the API key on /v1."""
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return error_response(411, "a request body needs a Content-Length header")
            limit = (
                settings.max_upload_bytes + 64 * 1024
                if request.url.path == "/v1/voices"
                else settings.max_body_bytes
            )
            if int(length) > limit:
                return error_response(413, f"the request body is {length} bytes; at most {limit} here")
        if request.url.path.startswith("/v1/") and settings.api_key:
            given = request.headers.get("authorization", "")
            expected = f"Bearer {settings.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return error_response(
                    401, "a valid API key is needed: Authorization: Bearer <key>", code="invalid_api_key"
                )
        return await call_next(request)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health():
        stats = live.stats()
        return {
            "status": "ok",
            "model": settings.model_name,
            "queued": stats.queued,
            "running": stats.running,
        }

    @app.get("/metrics")
    async def metrics():
        return Response(prometheus_text(live), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {"id": settings.model_name, "object": "model", "created": started, "owned_by": "s2train"}
            ],
        }

    @app.get("/v1/voices")
    async def list_voices():
        return {"object": "list", "data": [{"id": DEFAULT_VOICE, "text": None}, *voices.list()]}

    @app.post("/v1/voices", status_code=201)
    async def add_voice(request: Request):
        try:
            form = await request.form(max_files=1, max_fields=4, max_part_size=settings.max_upload_bytes)
        except Exception as error:  # noqa: BLE001 - a malformed multipart body, in any of its forms
            raise ApiError(
                400, f"the upload must be multipart/form-data with id, text and file ({error})"
            ) from error
        upload, voice_id, text = form.get("file"), form.get("id"), form.get("text")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "the upload needs a file field holding the clip", param="file")
        if not isinstance(voice_id, str) or not isinstance(text, str):
            raise ApiError(400, "the upload needs an id and the clip's transcript (text)", param="id")
        data = await upload.read(settings.max_upload_bytes + 1)
        try:
            return await run_in_threadpool(voices.add, voice_id, data, text)
        except VoiceError as error:
            raise ApiError(error.status, str(error), param="file") from error

    @app.delete("/v1/voices/{voice_id}")
    async def delete_voice(voice_id: str):
        try:
            clip = voices.delete(voice_id)
        except VoiceError as error:
            raise ApiError(error.status, str(error), param="voice") from error
        for key in [key for key in synth.references if key[0] == clip]:
            synth.references.pop(key, None)  # a new voice of the same id is encoded anew
        return {"id": voice_id, "object": "voice", "deleted": True}

    @app.post("/v1/audio/speech")
    async def speech(request: Request):
        body = await _speech_body(request)
        utterance = _utterance(body, voices, settings)
        try:
            engine_request = await run_in_threadpool(synth.request, utterance)
            engine_request = dataclasses.replace(engine_request, sampling=_sampling(body, synth.sampling))
        except ValueError as error:
            raise ApiError(400, str(error)) from error
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[AudioChunk | Finished] = asyncio.Queue()
        try:
            ticket = live.submit(
                engine_request, lambda item: loop.call_soon_threadsafe(items.put_nowait, item)
            )
        except QueueFull as error:
            raise ApiError(429, str(error), code="queue_full") from error
        except Closed as error:
            raise ApiError(503, str(error)) from error
        except ValueError as error:
            raise ApiError(400, str(error)) from error
        first = await items.get()  # an engine failure before any audio is still an error status
        if isinstance(first, Finished) and first.error:
            raise ApiError(500, first.error)
        rate = synth.sample_rate
        headers = {"X-Sample-Rate": str(rate), "X-Request-Seed": str(engine_request.seed)}

        async def chunks() -> AsyncIterator[AudioChunk | Finished]:
            item = first
            try:
                while True:
                    yield item
                    if isinstance(item, Finished):
                        return
                    item = await items.get()
            finally:
                live.cancel(ticket)  # a client that went away frees its row (a no-op once finished)

        stream = body.speed == 1.0 and body.response_format in ("wav", "pcm")
        if body.stream_format == "sse":
            return StreamingResponse(
                _sse(chunks(), rate, body.speed), media_type="text/event-stream", headers=headers
            )
        if stream:
            return StreamingResponse(
                _audio_stream(chunks(), rate, body.response_format),
                media_type=MEDIA[body.response_format],
                headers=headers,
            )
        return StreamingResponse(
            _whole(chunks(), rate, body.response_format, body.speed),
            media_type=MEDIA[body.response_format],
            headers=headers,
        )

    return app


async def _speech_body(request: Request) -> SpeechBody:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the body is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        return SpeechBody.model_validate(data)
    except ValidationError as error:
        raise ApiError(400, _describe(error.errors()), param=_first_param(error.errors())) from error


def _describe(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


def _first_param(errors: list[dict[str, Any]]) -> str | None:
    loc = errors[0].get("loc", ()) if errors else ()
    return str(loc[0]) if loc else None


def _utterance(body: SpeechBody, voices: VoiceRegistry, settings: ServeSettings) -> Utterance:
    text = body.input
    if not text.strip():
        raise ApiError(400, "input is empty: give the text to speak", param="input")
    if len(text) > settings.max_text_chars:
        raise ApiError(
            400, f"input is {len(text)} characters; at most {settings.max_text_chars}", param="input"
        )
    if body.model not in (settings.model_name, *OPENAI_MODELS):
        raise ApiError(
            404,
            f"model {body.model!r} is not served here; GET /v1/models lists {settings.model_name!r}",
            param="model",
        )
    voice = body.voice if isinstance(body.voice, str) else body.voice.get("id", "")
    reference = reference_text = None
    if voice != DEFAULT_VOICE:
        try:
            reference, reference_text = voices.get(voice)
        except VoiceError as error:
            raise ApiError(error.status, str(error), param="voice") from error
    if body.max_new_tokens is not None and body.max_new_tokens > settings.max_new_tokens:
        raise ApiError(
            400, f"max_new_tokens is at most {settings.max_new_tokens} on this server", param="max_new_tokens"
        )
    caption = body.caption if body.caption is not None else body.instructions
    return Utterance(
        "request",
        text,
        reference,
        reference_text,
        seed=body.seed,
        max_new_tokens=body.max_new_tokens or settings.max_new_tokens,
        literal=True,  # a client's text is text: control tokens in it are not parsed
        caption=caption.strip() or None if caption else None,
    )


def _sampling(body: SpeechBody, default: SamplingParams) -> SamplingParams:
    given = {name: getattr(body, name) for name in SAMPLING_FIELDS if getattr(body, name) is not None}
    if not given:
        return default
    try:
        return dataclasses.replace(default, **given)
    except ValueError as error:
        raise ApiError(400, str(error)) from error


async def _audio_stream(chunks: AsyncIterator, rate: int, fmt: str) -> AsyncIterator[bytes]:
    if fmt == "wav":
        yield wav_header(rate)
    async for item in chunks:
        if isinstance(item, AudioChunk) and len(item.audio):
            yield pcm16(item.audio.numpy())


async def _collect(chunks: AsyncIterator) -> tuple[np.ndarray, Finished]:
    parts, finished = [], None
    async for item in chunks:
        if isinstance(item, AudioChunk):
            parts.append(item.audio.numpy())
        else:
            finished = item
    return (np.concatenate(parts) if parts else np.zeros(0, np.float32)), finished


async def _whole(chunks: AsyncIterator, rate: int, fmt: str, speed: float) -> AsyncIterator[bytes]:
    audio, _ = await _collect(chunks)
    audio = await run_in_threadpool(stretch, audio, speed)
    yield await run_in_threadpool(encode, audio, rate, fmt)


def _event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


async def _sse(chunks: AsyncIterator, rate: int, speed: float) -> AsyncIterator[bytes]:
    """OpenAI's speech events: ``speech.audio.delta`` (base64 16-bit PCM at ``rate``), then
    ``speech.audio.done`` with the frames as output tokens."""
    frames, stopped = 0, False
    if speed != 1.0:
        audio, finished = await _collect(chunks)
        audio = await run_in_threadpool(stretch, audio, speed)
        yield _event({"type": "speech.audio.delta", "audio": base64.b64encode(pcm16(audio)).decode()})
        frames, stopped = (finished.frames, finished.stopped) if finished else (0, False)
    else:
        async for item in chunks:
            if isinstance(item, AudioChunk) and len(item.audio):
                yield _event(
                    {
                        "type": "speech.audio.delta",
                        "audio": base64.b64encode(pcm16(item.audio.numpy())).decode(),
                    }
                )
            elif isinstance(item, Finished):
                frames, stopped = item.frames, item.stopped
    yield _event(
        {
            "type": "speech.audio.done",
            "usage": {"input_tokens": 0, "output_tokens": frames, "total_tokens": frames},
            "sample_rate": rate,
            "stopped": stopped,
        }
    )


def prometheus_text(live: LiveEngine) -> str:
    """The live engine's figures in Prometheus' text format."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

    stats = live.stats()

    class _Collector:
        def collect(self):
            yield GaugeMetricFamily("s2train_queue_length", "Requests waiting for a row", value=stats.queued)
            yield GaugeMetricFamily("s2train_running_rows", "Requests generating now", value=stats.running)
            yield GaugeMetricFamily(
                "s2train_frames_per_second",
                f"Frames generated a second over the last {live.window_s:g} s",
                value=stats.frames_per_s,
            )
            yield CounterMetricFamily("s2train_frames", "Frames generated", value=stats.frames_total)
            yield CounterMetricFamily("s2train_requests", "Requests finished", value=stats.requests_total)
            ttfa = stats.first_audio_s
            yield SummaryMetricFamily(
                "s2train_time_to_first_audio_seconds",
                "From a request's arrival to its first audio (recent)",
                count_value=len(ttfa),
                sum_value=float(sum(ttfa)),
            )

    registry = CollectorRegistry()
    registry.register(_Collector())
    return generate_latest(registry).decode()
