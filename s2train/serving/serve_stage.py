"""``stage=serve``: the OpenAI-compatible speech server (``s2train.serving.app``) on one model.

    python -m s2train experiment=demo stage=serve                   # http://127.0.0.1:8000/ (the page)
    python -m s2train stage=serve serve.model=/models/s2-pro synthesize.codec=/models/s2-pro \\
        serve.host=0.0.0.0 serve.api_key=$KEY                       # one GPU, reachable by others

    curl -s http://127.0.0.1:8000/v1/audio/speech -H 'Content-Type: application/json' \\
        -d '{"model": "s2train", "input": "Hello there.", "response_format": "wav"}' -o hello.wav

The model is ``serve.model`` (any ``open_dual_ar`` format: a run directory, a LoRA adapter, a released
S2 Pro folder; default ``synthesize.model``, else this experiment's ``sft`` run), loaded with its codec
and tokenizer by the synthesis call (``synthesize.*``: device, dtype, sampling defaults, ``batch_size``
rows of live continuous batching). Voices are kept in ``serve.voice_dir`` (default ``run_dir/voices``).
It binds to 127.0.0.1 unless ``serve.host`` says otherwise; ``serve.api_key`` (or the environment's
``S2TRAIN_API_KEY``) makes every ``/v1`` call need it. SIGINT or SIGTERM stops it; ``results.json``
then holds the requests and frames it served.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from s2train.checks import check
from s2train.runs import stage_input, write_json_atomic

if TYPE_CHECKING:
    from s2train.config import S2Config


@dataclass
class ServeConfig:
    model: str | None = None  # None: synthesize.model, else run_root/name/sft
    model_name: str = (
        "s2train"  # the id /v1/models lists (OpenAI's tts-1, tts-1-hd, gpt-4o-mini-tts also work)
    )
    host: str = "127.0.0.1"  # 0.0.0.0 exposes it to the network: set an api_key then
    port: int = 8000
    api_key: str | None = None  # None: the environment's S2TRAIN_API_KEY, if set
    voice_dir: str | None = None  # None: run_dir/voices
    max_queue: int = 64  # waiting requests beyond the running rows; more get 429
    max_positions: int = 4096  # key/value slots a row: prompt (reference included) plus frames
    max_new_tokens: int | None = None  # frames a request at most (21.5/s for S2 Pro); None: synthesize's
    max_text_chars: int = 4096
    max_body_kb: int = 64  # a JSON request's body
    max_upload_mb: float = 10.0  # a voice clip
    max_voice_s: float = 30.0
    first_chunk_frames: int = 8  # the first audio of a stream after this many frames ...
    chunk_frames: int = 16  # ... then a chunk every this many
    log_level: str = "info"

    def __post_init__(self) -> None:
        check(0 <= self.port < 65536, f"serve.port must be 0..65535, not {self.port}")
        for name in ("max_queue", "max_positions", "max_text_chars", "max_body_kb"):
            check(getattr(self, name) >= 1, f"serve.{name} must be at least 1, not {getattr(self, name)}")
        check(
            self.max_new_tokens is None or self.max_new_tokens >= 1, "serve.max_new_tokens must be at least 1"
        )
        check(
            self.max_upload_mb > 0 and self.max_voice_s > 0, "serve.max_upload_mb and max_voice_s must be > 0"
        )
        check(
            self.first_chunk_frames >= 1 and self.chunk_frames >= 1,
            "serve.first_chunk_frames and serve.chunk_frames must be at least 1",
        )


def build(cfg: S2Config) -> tuple:
    """The synthesizer, live engine, voice registry and app of ``cfg`` (what ``run`` serves)."""
    from s2train.inference.synthesis import Synthesizer
    from s2train.serving.app import ServeSettings, create_app
    from s2train.serving.live import LiveEngine
    from s2train.serving.voices import VoiceRegistry

    s = cfg.serve
    model = Path(s.model) if s.model else stage_input(cfg, "sft", cfg.synthesize.model)
    synth = Synthesizer.open(cfg.synthesize, cfg.text, model, cfg.synthesize.codec or cfg.tokenize.codec)
    live = LiveEngine(
        synth,
        max_queue=s.max_queue,
        slots=s.max_positions,
        first_chunk_frames=s.first_chunk_frames,
        chunk_frames=s.chunk_frames,
    )
    voices = VoiceRegistry(
        Path(s.voice_dir) if s.voice_dir else Path(cfg.run_dir) / "voices",
        max_bytes=int(s.max_upload_mb * 2**20),
        max_seconds=s.max_voice_s,
    )
    settings = ServeSettings(
        model_name=s.model_name,
        api_key=s.api_key or os.environ.get("S2TRAIN_API_KEY") or None,
        max_text_chars=s.max_text_chars,
        max_body_bytes=s.max_body_kb * 1024,
        max_upload_bytes=int(s.max_upload_mb * 2**20),
        max_new_tokens=s.max_new_tokens or cfg.synthesize.max_new_tokens,
    )
    return synth, live, voices, create_app(synth, live, voices, settings)


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server with our signal handling: SIGINT or SIGTERM stops it and the stage reports
        (uvicorn's own handlers raise the signal again once stopped, which would kill the process)."""

        @contextlib.contextmanager
        def capture_signals(self):
            yield

    return Server


def run(cfg: S2Config) -> dict:
    import uvicorn

    _Server = _server_class()

    s = cfg.serve
    synth, live, voices, app = build(cfg)
    if s.host not in ("127.0.0.1", "localhost", "::1") and not app.state.settings.api_key:
        print(f"warning: serving on {s.host} without an API key: anyone who reaches it can use it")
    write_json_atomic(
        Path(cfg.run_dir) / "serve.json", {"url": f"http://{s.host}:{s.port}/", "pid": os.getpid()}
    )
    server = _Server(
        uvicorn.Config(app, host=s.host, port=s.port, log_level=s.log_level, timeout_graceful_shutdown=5)
    )
    stop = lambda signum, frame: setattr(server, "should_exit", True)  # noqa: E731
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        live.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    stats = live.stats()
    return {
        "url": f"http://{s.host}:{s.port}/",
        "model": synth.model_name,
        "codec": synth.codec_name,
        "device": str(synth.device),
        "requests": stats.requests_total,
        "frames": stats.frames_total,
        "voices": len(voices.list()),
    }
