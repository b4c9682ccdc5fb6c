"""Serving: throughput and time to first audio of stage=serve at 1, 8 and 32 concurrent clients, against
sequential one-at-a-time serving, in one run.

The model is the CPU demo's shape (``model=demo`` fitted to the byte tokenizer, on ``--codebooks`` 2 of
the demo codec's 8 codebooks as the demo trains it; random weights, seed 0) with the ``demo`` codec
(random weights: decoding costs the same). Each server is the real app (``create_app`` over a
``LiveEngine``) on loopback under uvicorn; each client is a thread with an ``httpx`` connection that sends
``--requests`` requests back to back (``response_format=pcm``, streamed; one of eight sentences, its own
seed) and reads the audio as it comes. Every request generates exactly ``--frames`` frames
(``min_new_tokens = max_new_tokens``: the benchmark fixes the length, so both servers do the same work).

- ours: live continuous batching with ``--rows`` rows (default 32): a request joins the running batch at
  the next frame.
- baseline: the same server with one row: requests are served one at a time, in arrival order.
- frames/s = all frames generated / wall time of the clients; time to first audio = from sending a request
  to its first audio bytes, client side, mean (and 90th percentile) over requests.
- ratio = ours frames/s / baseline frames/s, per concurrency.

    python benchmarks/serve.py                    # about 1.5 min on this machine, 1 thread
    python benchmarks/serve.py --concurrency 1 8  # fewer

One intra-op thread by default, as the other benchmarks (the 2-core machine also runs the clients). On a
GPU the same script serves the ``s2pro`` shape with ``--preset s2pro --device cuda`` (not measured here: no
GPU was lent).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from benchmarks.inference import SENTENCES  # noqa: E402
from s2train.inference.synthesis import Synthesizer  # noqa: E402
from s2train.models.codec import Codec, CodecConfig  # noqa: E402
from s2train.models.dual_ar import DualAR, demo, s2pro  # noqa: E402
from s2train.serving.app import ServeSettings, create_app  # noqa: E402
from s2train.serving.live import LiveEngine  # noqa: E402
from s2train.serving.voices import VoiceRegistry  # noqa: E402
from s2train.text.tokenizer import ByteTokenizer  # noqa: E402
from s2train.training.pretrain_stage import fit_model_to_data  # noqa: E402


def build(args) -> tuple[DualAR, Codec, ByteTokenizer]:
    preset = {"demo": demo, "s2pro": s2pro}[args.preset]()
    codec_file = ROOT / "conf" / "codec" / f"{args.preset}.yaml"
    codec_cfg = CodecConfig(**OmegaConf.to_container(OmegaConf.load(codec_file)))
    codebooks = args.codebooks or preset.num_codebooks
    tokenizer = ByteTokenizer(4, codec_cfg.semantic_codebook_size)
    sizes = [codec_cfg.semantic_codebook_size] + [codec_cfg.codebook_size] * (codebooks - 1)
    config, _ = fit_model_to_data(preset, tokenizer, sizes, codebooks)
    torch.manual_seed(0)
    model = DualAR(config).eval().to(args.device)
    torch.manual_seed(1)
    codec = Codec(codec_cfg).eval().to(args.device)
    return model, codec, tokenizer


class Server:
    """The real app on loopback, in this process."""

    def __init__(self, model, codec, tokenizer, rows: int, args, folder: Path):
        import uvicorn

        self.synth = Synthesizer(model, codec, tokenizer, max_new_tokens=args.frames, batch_size=rows)
        made = self.synth.request

        def fixed_length(u):  # the benchmark's requests all generate exactly --frames frames
            return dataclasses.replace(made(u), max_new_tokens=args.frames, min_new_tokens=args.frames)

        self.synth.request = fixed_length
        self.live = LiveEngine(
            self.synth,
            max_queue=4096,
            slots=1024,
            first_chunk_frames=args.first_chunk,
            chunk_frames=args.chunk,
        )
        settings = ServeSettings(max_new_tokens=args.frames)
        app = create_app(self.synth, self.live, VoiceRegistry(folder), settings)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.live.close()


def load(port: int, clients: int, requests: int, frame_samples: int) -> dict:
    """``clients`` threads, each sending ``requests`` streamed requests back to back."""
    import httpx

    url = f"http://127.0.0.1:{port}/v1/audio/speech"

    def client(c: int) -> list[tuple[float, float, int]]:
        out = []
        with httpx.Client(timeout=600) as http:
            for r in range(requests):
                body = {
                    "model": "s2train",
                    "input": SENTENCES[(c + r) % len(SENTENCES)],
                    "response_format": "pcm",
                    "seed": 1000 * c + r,
                }
                sent, first, size = time.perf_counter(), None, 0
                with http.stream("POST", url, json=body) as response:
                    assert response.status_code == 200, response.read()
                    for part in response.iter_bytes():
                        if first is None and part:
                            first = time.perf_counter() - sent
                        size += len(part)
                out.append((first or 0.0, time.perf_counter() - sent, size))
        return out

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        rows = [row for part in pool.map(client, range(clients)) for row in part]
    wall = time.perf_counter() - started
    frames = sum(size // 2 for _, _, size in rows) / frame_samples
    firsts = sorted(first for first, _, _ in rows)
    return {
        "requests": len(rows),
        "frames": round(frames),
        "wall_s": round(wall, 3),
        "frames_per_s": round(frames / wall, 1),
        "first_audio_s_mean": round(statistics.mean(firsts), 4),
        "first_audio_s_p90": round(firsts[int(0.9 * (len(firsts) - 1))], 4),
        "request_s_mean": round(statistics.mean(total for _, total, _ in rows), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo", choices=["demo", "s2pro"])
    parser.add_argument("--codebooks", type=int, default=2, help="0: the preset's")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=4, help="per client, back to back")
    parser.add_argument("--frames", type=int, default=100, help="per request (2 s of demo audio)")
    parser.add_argument("--rows", type=int, default=32, help="our server's batch rows")
    parser.add_argument("--first-chunk", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, codec, tokenizer = build(args)
    frame_samples = codec.samples_per_frame

    out = {
        "benchmark": "serve",
        "command": "python benchmarks/" + os.path.basename(__file__) + " " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s)",
        "preset": args.preset,
        "codebooks": model.config.num_codebooks,
        "frames_per_request": args.frames,
        "requests_per_client": args.requests,
        "rows": args.rows,
        "results": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for clients in args.concurrency:
            row = {"clients": clients}
            for name, rows in (("ours", args.rows), ("sequential", 1)):
                server = Server(model, codec, tokenizer, rows, args, Path(tmp) / f"{name}-{clients}")
                try:
                    load(server.port, 1, 1, frame_samples)  # warm-up
                    row[name] = load(server.port, clients, args.requests, frame_samples)
                finally:
                    server.close()
            row["throughput_ratio"] = round(
                row["ours"]["frames_per_s"] / row["sequential"]["frames_per_s"], 2
            )
            row["first_audio_ratio"] = round(
                row["sequential"]["first_audio_s_mean"] / row["ours"]["first_audio_s_mean"], 2
            )
            out["results"].append(row)
            print(json.dumps(row), flush=True)
    path = ROOT / "benchmarks" / "results" / "serve.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
