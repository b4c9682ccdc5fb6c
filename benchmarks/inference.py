"""Inference speed: the cached, continuously batched engine against the naive loop, and the GPU path.

**CPU** (``--presets``, default ``tiny small``). For each preset, a random model (seed 0) fitted to the
byte tokenizer with ``fit_model_to_data`` as ``stage=pretrain`` does (tiny: vocabulary 384; small: 4,416
instead of S2 Pro's 155,776, which the engine's restricted head never reads anyway), and B requests
(``--batches``, default 1 and 8) built by ``speech_request``: a cloned voice (a reference of
``--reference-frames`` random frames with its transcript) and one of eight sentences, the same voice for
all. Every request generates exactly F frames (``min_new_tokens = max_new_tokens = F``: ``<|im_end|>`` is
never drawn; ``--tiny-frames`` 400, ``--small-frames`` 32) with S2-style sampling (temperature 0.7,
top-p 0.9 for both models, repetition-aware sampling) and its own seed.

- ours: ``InferenceEngine(max_batch=B).generate`` after an untimed warm-up run; frames/s = B x F / wall
  time (prefill and generation; the cloned voice's prefix computed once, then reused from the prefix
  cache), the median of ``--repeats`` (3) timed runs, as for every loop here. Time to first audio: a second, streamed run (``stream_audio``, a codec of the model's
  codebooks: tiny: the ``tiny`` codec; small: the ``tiny`` codec's layers with S2 Pro's 1 x 4096 + 9 x
  1024 codebooks) of the same requests, seconds from the call to a request's first chunk of
  ``--first-chunk`` frames, mean over the B requests.
- baseline: ``generate_naive`` (no cache: the whole sequence through the slow model, and the frame
  through the fast model, for every frame and code) on request 0 with the same seed. It decodes one
  sequence at a time, so B requests take B times as long: its frames/s is the same at every B, and it is
  measured once per preset. Its time to first audio: ``--first-chunk`` frames, then decoding them.
- check: the engine at batch 1 draws exactly the naive loop's tokens (same seed), asserted.
- ratio = ours frames/s / naive frames/s.
- compiled (``--compile-presets``, default ``tiny``): ``InferenceEngine(compile=True)``, the fixed-shape
  step compiled by inductor; the first run of the requests compiles (``compile_and_first_run_s``), then
  the timed runs; time to first audio from a streamed run stopped once every request has its first
  chunk; at batch 1 its tokens equal the naive loop's (asserted).

**GPU** (when CUDA is available): the ``s2pro`` shape with random weights in bfloat16 (the slow 36 x 2560
and fast 4 x 2560 transformers, 10 codebooks) and the ``s2pro`` codec (random, float32), the frame step
replayed as a CUDA graph. Prompts of ``--gpu-prompt`` positions (S2 Pro's <|im_end|> id, random text ids,
``--reference-frames-gpu`` reference frames, the same voice for all), ``--gpu-frames`` frames each, at
batch 1 and 32, one warm-up run (graph capture) first. Reported: frames/s of ``engine.generate``; time to
first audio and real-time factor (wall time / seconds of audio of one request, at the codec's 44.1 kHz /
2048 = 21.5 frames per second) of a streamed run, decoding included; and at batch 1 the fraction of the
memory-bandwidth bound: the bytes one frame must read at least (every weight of the slow model's layers
once, the LM head rows of the 4,097 allowed tokens, the fast model's layers and head once per code
c1..c9, the slow keys and values of the mean context) / the GPU's peak bandwidth (``--gpu-bandwidth-tbs``;
H100 SXM 3.35, H200 4.8 TB/s by device name), divided by the measured seconds per frame.

    python benchmarks/inference.py                          # CPU, tiny and small, 1 thread, about 6 min
    python benchmarks/inference.py --presets                # GPU part only (needs CUDA)

One intra-op thread by default, as the other benchmarks: on the shared 2-core development machine a
second thread waits for busy cores (decoding is thousands of small ops). ``--threads 2`` on an idle one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from s2train.inference.engine import InferenceEngine, Request, speech_request, stream_audio
from s2train.inference.naive import generate_naive
from s2train.inference.sampling import SamplingParams
from s2train.models.codec import Codec
from s2train.models.codec import s2pro as codec_s2pro
from s2train.models.codec import tiny as codec_tiny
from s2train.models.dual_ar import DualAR, s2pro, small, tiny
from s2train.text.prompt import Reference
from s2train.text.tokenizer import ByteTokenizer
from s2train.training.pretrain_stage import fit_model_to_data

PRESETS = {"tiny": tiny, "small": small}
SENTENCES = [
    "The morning train was late again, so we walked to the office.",
    "Please put the green box on the table near the window.",
    "My brother likes to cook rice and beans on Sunday evenings.",
    "We planted three apple trees behind the old stone house.",
    "The library closes early on Fridays during the summer.",
    "She painted the fence blue and the door a bright yellow.",
    "Turn left at the bakery and walk two more blocks.",
    "A cold wind came down from the hills after sunset.",
]
SAMPLING = SamplingParams()  # temperature 0.7, top-p 0.9 (slow and fast), repetition-aware sampling


def cpu_model(name: str) -> tuple[DualAR, ByteTokenizer, Codec]:
    preset = PRESETS[name]()
    tokenizer = ByteTokenizer(4, preset.codebook_size)
    sizes = [preset.codebook_size] + [preset.residual_codebook_size] * (preset.num_codebooks - 1)
    config, _ = fit_model_to_data(preset, tokenizer, sizes)
    torch.manual_seed(0)
    model = DualAR(config).eval()
    codec_config = dataclasses.replace(
        codec_tiny(),
        semantic_codebook_size=config.codebook_size,
        n_residual_codebooks=config.num_codebooks - 1,
        codebook_size=config.residual_codebook_size,
    )
    return model, tokenizer, Codec(codec_config).eval()


def cpu_requests(
    model: DualAR, tokenizer: ByteTokenizer, batch: int, frames: int, ref_frames: int
) -> list[Request]:
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    codes = torch.cat(
        [
            torch.randint(0, cfg.codebook_size, (1, ref_frames), generator=g),
            torch.randint(0, cfg.residual_codebook_size, (cfg.num_codebooks - 1, ref_frames), generator=g),
        ]
    )
    voice = Reference("A sentence the reference speaker said, in her own voice.", codes)
    return [
        speech_request(
            tokenizer,
            SENTENCES[i % len(SENTENCES)],
            cfg.num_codebooks,
            references=[voice],
            max_new_tokens=frames,
            min_new_tokens=frames,
            sampling=SAMPLING,
            seed=1000 + i,
        )
        for i in range(batch)
    ]


def timed(run, repeats: int):
    """The median wall time of ``repeats`` calls of ``run()`` (this machine's timings swing by a quarter
    from run to run), every wall time, and the last call's result."""
    walls, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        walls.append(time.perf_counter() - started)
    return statistics.median(walls), [round(w, 3) for w in walls], result


def timed_stream(engine: InferenceEngine, codec: Codec, requests: list[Request], first_chunk: int) -> dict:
    """Run the requests through stream_audio: wall time, first-audio times, the generations."""
    first_audio: dict[int, float] = {}
    generations = {}
    samples = 0
    started = time.perf_counter()
    for chunk in stream_audio(engine, codec, requests, first_chunk_frames=first_chunk, chunk_frames=32):
        first_audio.setdefault(chunk.index, time.perf_counter() - started)
        samples += len(chunk.audio)
        if chunk.final:
            generations[chunk.index] = chunk.generation
    wall = time.perf_counter() - started
    return {
        "wall_s": wall,
        "first_audio_s": [first_audio[i] for i in range(len(requests))],
        "samples": samples,
        "generations": generations,
    }


def bench_cpu_preset(name: str, args) -> dict:
    model, tokenizer, codec = cpu_model(name)
    frames = args.tiny_frames if name == "tiny" else args.small_frames
    cfg = model.config
    row: dict = {
        "params_slow": sum(p.numel() for p in model.slow.parameters()),
        "params_fast": sum(p.numel() for p in model.fast.parameters()),
        "vocab_size": cfg.vocab_size,
        "codebooks": f"1 x {cfg.codebook_size} + {cfg.num_codebooks - 1} x {cfg.residual_codebook_size}",
        "frames_per_request": frames,
    }
    ours = {}
    im_end = tokenizer.token_id("<|im_end|>")
    for batch in args.batches:
        requests = cpu_requests(model, tokenizer, batch, frames, args.reference_frames)
        engine = InferenceEngine(model, im_end, max_batch=batch)
        engine.generate(
            [dataclasses.replace(r, max_new_tokens=4, min_new_tokens=4) for r in requests]
        )  # warm-up
        hits = []

        def cold_run(engine=engine, requests=requests, hits=hits):
            engine.prefix_cache.clear()  # each timed run computes its voice's prefix once, like a cold server
            before = engine.prefix_cache.hits
            generations = engine.generate(requests)
            hits.append(engine.prefix_cache.hits - before)
            return generations

        wall, walls, generations = timed(cold_run, args.repeats)
        assert all(g.codes.shape[1] == frames for g in generations)
        # First audio: a streamed run of the same requests, cut after the first chunk's frames.
        engine.prefix_cache.clear()
        short = [
            dataclasses.replace(r, max_new_tokens=args.first_chunk, min_new_tokens=args.first_chunk)
            for r in requests
        ]
        stream = timed_stream(engine, codec, short, args.first_chunk)
        ours[batch] = {
            "prompt_positions": requests[0].prompt.shape[1],
            "wall_s": round(wall, 3),
            "wall_s_runs": walls,
            "frames_per_s": round(batch * frames / wall, 2),
            "time_to_first_audio_s": round(statistics.mean(stream["first_audio_s"]), 4),
            "prefix_cache_hits": hits[-1],
        }
        if batch == 1:
            tokens_b1 = generations[0].tokens
        print(f"  {name} ours batch {batch}: {json.dumps(ours[batch])}", flush=True)

    request = cpu_requests(model, tokenizer, 1, frames, args.reference_frames)[0]
    naive_kwargs = dict(im_end_id=im_end, sampling=SAMPLING)
    started = time.perf_counter()
    first = generate_naive(
        model,
        request.prompt,
        max_new_tokens=args.first_chunk,
        min_new_tokens=args.first_chunk,
        generator=torch.Generator().manual_seed(request.seed),
        **naive_kwargs,
    )
    with torch.no_grad():
        codec.stream_decoder().push(first.codes)
    naive_first_audio = time.perf_counter() - started
    naive_wall, naive_walls, naive = timed(
        lambda: generate_naive(
            model,
            request.prompt,
            max_new_tokens=frames,
            min_new_tokens=frames,
            generator=torch.Generator().manual_seed(request.seed),
            **naive_kwargs,
        ),
        args.repeats,
    )
    if 1 in ours:
        assert torch.equal(naive.tokens, tokens_b1), "the engine and the naive loop drew different tokens"
        row["engine_equals_naive_tokens"] = True
    row["naive"] = {
        "wall_s": round(naive_wall, 3),
        "wall_s_runs": naive_walls,
        "frames_per_s": round(frames / naive_wall, 2),
        "time_to_first_audio_s": round(naive_first_audio, 4),
    }
    print(f"  {name} naive: {json.dumps(row['naive'])}", flush=True)
    row["ours"] = {str(b): v for b, v in ours.items()}
    row["ratio_frames_per_s"] = {
        str(b): round(v["frames_per_s"] / row["naive"]["frames_per_s"], 2) for b, v in ours.items()
    }
    if name in args.compile_presets:
        compiled = {}
        for batch in args.batches:
            compiled[str(batch)], first_tokens = bench_compiled(model, tokenizer, codec, batch, frames, args)
            if batch == 1:
                assert torch.equal(first_tokens, naive.tokens), "compiled and naive tokens differ"
                row["compiled_equals_naive_tokens"] = True
            print(f"  {name} compiled batch {batch}: {json.dumps(compiled[str(batch)])}", flush=True)
        row["compiled"] = compiled
        row["ratio_compiled_frames_per_s"] = {
            b: round(v["frames_per_s"] / row["naive"]["frames_per_s"], 2) for b, v in compiled.items()
        }
    return row


def bench_compiled(
    model: DualAR, tokenizer: ByteTokenizer, codec: Codec, batch: int, frames: int, args
) -> tuple[dict, torch.Tensor]:
    """``InferenceEngine(compile=True)``: the fixed-shape step compiled on the first run of these requests
    (timed apart as ``compile_s``, since a new shape compiles anew), then a timed run; time to first audio
    from a streamed run of the same requests, stopped once every request has its first chunk. Returns the
    figures and request 0's tokens."""
    requests = cpu_requests(model, tokenizer, batch, frames, args.reference_frames)
    engine = InferenceEngine(model, tokenizer.token_id("<|im_end|>"), max_batch=batch, compile=True)
    started = time.perf_counter()
    engine.generate(requests)  # compiles, then runs
    compile_s = time.perf_counter() - started

    def cold_run():
        engine.prefix_cache.clear()
        return engine.generate(requests)

    wall, walls, generations = timed(cold_run, args.repeats)
    assert all(g.codes.shape[1] == frames for g in generations)
    engine.prefix_cache.clear()
    first_audio: dict[int, float] = {}
    started = time.perf_counter()
    for chunk in stream_audio(engine, codec, requests, first_chunk_frames=args.first_chunk, chunk_frames=32):
        first_audio.setdefault(chunk.index, time.perf_counter() - started)
        if len(first_audio) == batch:
            break
    figures = {
        "compile_and_first_run_s": round(compile_s, 1),
        "wall_s": round(wall, 3),
        "wall_s_runs": walls,
        "frames_per_s": round(batch * frames / wall, 2),
        "time_to_first_audio_s": round(statistics.mean(first_audio.values()), 4),
    }
    return figures, generations[0].tokens


# ------------------------------------------------------------------------------------------------- GPU


def bandwidth_bound_bytes(model: DualAR, context: float) -> int:
    """Bytes one frame of one request must read at least (module docstring)."""
    cfg = model.config
    size = model.slow.embeddings.weight.element_size()
    slow = sum(p.numel() for p in model.slow.layers.parameters()) + cfg.dim
    head = (cfg.codebook_size + 1) * cfg.dim
    embed = (1 + cfg.num_codebooks) * cfg.dim
    fast_once = sum(p.numel() for p in model.fast.layers.parameters()) + cfg.fast_dim
    fast_once += model.fast.output.weight.numel() + cfg.fast_dim  # head, one embedding row
    kv = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * context
    return int((slow + head + embed + (cfg.num_codebooks - 1) * fast_once + kv) * size)


def gpu_requests(cfg, batch: int, prompt: int, ref_frames: int, frames: int) -> list[Request]:
    """Prompts in the layout of a voice-cloning chat prompt, of random ids: a system turn of text and
    ``ref_frames`` reference frames, the same for every request (the shared prefix), then a user turn of
    text of its own; ``prompt`` positions in all."""
    g = torch.Generator().manual_seed(2)
    text_id = lambda n: torch.randint(0, cfg.semantic_begin_id - 1000, (n,), generator=g)  # noqa: E731
    system_text = (prompt - ref_frames) // 2
    prefix = system_tokens = torch.zeros(1 + cfg.num_codebooks, system_text + ref_frames, dtype=torch.long)
    system_tokens[0, :system_text] = text_id(system_text)
    codes = torch.cat(
        [
            torch.randint(0, cfg.codebook_size, (1, ref_frames), generator=g),
            torch.randint(0, cfg.residual_codebook_size, (cfg.num_codebooks - 1, ref_frames), generator=g),
        ]
    )
    system_tokens[0, system_text:] = cfg.semantic_begin_id + codes[0]
    system_tokens[1:, system_text:] = codes
    requests = []
    for i in range(batch):
        user = torch.zeros(1 + cfg.num_codebooks, prompt - prefix.shape[1], dtype=torch.long)
        user[0] = text_id(user.shape[1])
        requests.append(
            Request(
                torch.cat([prefix, user], dim=1),
                max_new_tokens=frames,
                min_new_tokens=frames,
                sampling=SAMPLING,
                seed=i,
                prefix_len=prefix.shape[1],
            )
        )
    return requests


def bench_gpu_s2pro(args) -> dict:  # pragma: no cover - needs CUDA
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = args.gpu_bandwidth_tbs or (4.8 if "H200" in name else 3.35 if "H100" in name else None)
    torch.manual_seed(0)
    with torch.device(device):
        model = DualAR(s2pro())
    model = model.to(torch.bfloat16).eval()
    codec = Codec(codec_s2pro()).to(device).eval()
    im_end = 151645  # S2 Pro's <|im_end|>
    cfg = model.config
    report: dict = {"device": name, "peak_bandwidth_tbs": peak, "frames_per_request": args.gpu_frames}
    for batch in (1, 32):
        requests = gpu_requests(cfg, batch, args.gpu_prompt, args.reference_frames_gpu, args.gpu_frames)
        engine = InferenceEngine(model, im_end, max_batch=batch)
        timed_stream(engine, codec, requests, args.first_chunk)  # warm-up: CUDA graph capture, allocator
        engine.prefix_cache.clear()
        torch.cuda.synchronize()
        run = timed_stream(engine, codec, requests, args.first_chunk)  # generation + streaming decode
        engine.prefix_cache.clear()
        torch.cuda.synchronize()
        started = time.perf_counter()
        engine.generate(requests)  # generation alone
        torch.cuda.synchronize()
        generate_s = time.perf_counter() - started
        audio_s = args.gpu_frames / codec.frame_rate
        row = {
            "frames_per_s": round(batch * args.gpu_frames / generate_s, 1),
            "s_per_frame_step": round(generate_s / args.gpu_frames, 5),
            "stream_wall_s": round(run["wall_s"], 3),
            "time_to_first_audio_s": round(statistics.mean(run["first_audio_s"]), 4),
            "real_time_factor": round(run["wall_s"] / audio_s, 4),  # per request, decoding included
            "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        }
        if batch == 1:
            bound = bandwidth_bound_bytes(model, args.gpu_prompt + args.gpu_frames / 2)
            row["bytes_per_frame"] = bound
            if peak:
                row["bandwidth_bound_s_per_frame"] = round(bound / (peak * 1e12), 5)
                row["fraction_of_bandwidth_bound"] = round(bound / (peak * 1e12) / row["s_per_frame_step"], 3)
        report[f"batch_{batch}"] = row
        print(f"  gpu s2pro batch {batch}: {json.dumps(row)}", flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/inference.json"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--presets", nargs="*", default=["tiny", "small"], choices=sorted(PRESETS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--tiny-frames", type=int, default=400)
    parser.add_argument("--small-frames", type=int, default=32)
    parser.add_argument("--reference-frames", type=int, default=64, help="frames of the cloned voice's codes")
    parser.add_argument("--first-chunk", type=int, default=8, help="frames before the first audio")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each loop; the median counts")
    parser.add_argument(
        "--compile-presets",
        nargs="*",
        default=["tiny"],
        choices=sorted(PRESETS),
        help="presets also run with InferenceEngine(compile=True) (about 1-2 min of compiling each)",
    )
    parser.add_argument("--gpu-frames", type=int, default=256)
    parser.add_argument("--gpu-prompt", type=int, default=320, help="prompt positions on the GPU")
    parser.add_argument("--reference-frames-gpu", type=int, default=215, help="10 s at 21.5 Hz")
    parser.add_argument("--gpu-bandwidth-tbs", type=float, default=None)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    started = time.perf_counter()
    report: dict = {
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "sampling": dataclasses.asdict(SAMPLING),
        "cpu_presets": {},
    }
    for name in args.presets:
        report["cpu_presets"][name] = bench_cpu_preset(name, args)
        print(f"{name}: ratio {report['cpu_presets'][name]['ratio_frames_per_s']}", flush=True)
    report["gpu_s2pro"] = bench_gpu_s2pro(args)
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['wall_s']} s)")


if __name__ == "__main__":
    main()
