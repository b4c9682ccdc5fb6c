"""Speed of our RVQ codec against descript-audio-codec's DAC, in seconds of audio per second of compute.

Both codecs are built with random weights (fixed seed) in the same process, run under
``torch.inference_mode`` on the same audio, batch 1, on a fixed number of CPU threads:

- ``tiny`` (16 kHz) against a DAC of the same encoder/decoder widths, strides, codebook width and
  codebook count: encode (audio -> codes) and decode (codes -> audio) separately, on 10 s of audio.
- ``s2pro`` (44.1 kHz) against DAC's standard 44.1 kHz configuration: the whole forward pass
  (encode, quantise, decode), on 2 s of audio.

Each timing is the median of ``--repeats`` (``--s2pro-repeats``) runs after ``--warmup``
(``--s2pro-warmup``) runs; ours and DAC alternate run by run so that load from other processes on a
shared machine falls on both. ``ratio`` is ours / DAC in real-time multiples (above 1: ours is faster).

The default is one intra-op thread: on the shared 2-core development machine, with other jobs running,
two threads made both codecs 3-6x slower than one and swung the ratio from 0.26 to 2 between runs
(OpenMP workers waiting on each other for a busy core). Pass ``--threads 2`` on an idle machine.

DAC is not a dependency of s2train. ``pip install descript-audio-codec`` pins protobuf<3.20 (through
descript-audiotools), which would downgrade the protobuf 7 that onnxruntime uses to 3.19.6, so
install it without its dependencies plus what ``import dac`` needs::

    pip install --no-deps descript-audio-codec descript-audiotools flatten-dict julius ffmpy \\
        importlib_resources randomname einops argbind docstring_parser
    pip install rich tensorboard

    python benchmarks/codec.py
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from s2train.models.codec import Codec, CodecConfig, s2pro, tiny

INSTALL = """\
    pip install --no-deps descript-audio-codec descript-audiotools flatten-dict julius ffmpy \\
        importlib_resources randomname einops argbind docstring_parser
    pip install rich tensorboard"""


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def params_by_part(model: torch.nn.Module) -> dict[str, int]:
    """Both codecs have an ``encoder``, a ``quantizer`` and a ``decoder``."""
    return {name: n_params(getattr(model, name)) for name in ("encoder", "quantizer", "decoder")}


def timing_row(audio_s: float, measured: tuple) -> dict:
    ours_s, base_s, ours_all, base_all = measured[:4]
    return {
        "ours_seconds": round(ours_s, 4),
        "dac_seconds": round(base_s, 4),
        "ours_x_realtime": round(audio_s / ours_s, 2),
        "dac_x_realtime": round(audio_s / base_s, 2),
        "ratio": round(base_s / ours_s, 3),
        "ours_all_seconds": [round(t, 4) for t in ours_all],
        "dac_all_seconds": [round(t, 4) for t in base_all],
    }


def summary(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.endswith("all_seconds")}


def paired_medians(
    ours: Callable[[], Any], baseline: Callable[[], Any], warmup: int, repeats: int
) -> tuple[float, float, list[float], list[float], Any, Any]:
    """Median seconds of ``ours`` and ``baseline``, run alternately (ours first on even repeats), every
    time, and the outputs of the first warm-up run (``warmup`` must be at least 1)."""
    ours_out, baseline_out = ours(), baseline()
    for _ in range(warmup - 1):
        ours()
        baseline()
    times: dict[str, list[float]] = {"ours": [], "baseline": []}
    for i in range(repeats):
        order = [("ours", ours), ("baseline", baseline)]
        for name, fn in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return (
        statistics.median(times["ours"]),
        statistics.median(times["baseline"]),
        times["ours"],
        times["baseline"],
        ours_out,
        baseline_out,
    )


def dac_like(cfg: CodecConfig, dac_module) -> torch.nn.Module:
    """A DAC with our encoder/decoder sizes and as many codebooks as ours (DAC has no semantic codebook,
    no transformers and no frame-rate reduction after the encoder, so it quantises at the hop rate)."""
    return dac_module.model.DAC(
        encoder_dim=cfg.encoder_dim,
        encoder_rates=list(cfg.encoder_rates),
        decoder_dim=cfg.decoder_dim,
        decoder_rates=list(cfg.decoder_rates),
        n_codebooks=cfg.n_codebooks,
        codebook_size=cfg.codebook_size,
        codebook_dim=cfg.codebook_dim,
        sample_rate=cfg.sample_rate,
    )


def bitrate(frame_rate: float, codebook_sizes: list[int]) -> int:
    """Bits per second of audio: each code costs ceil(log2(codebook size)) bits."""
    return round(frame_rate * sum(max(size - 1, 1).bit_length() for size in codebook_sizes))


def ours_bitrate(cfg: CodecConfig) -> int:
    sizes = [cfg.semantic_codebook_size] + [cfg.codebook_size] * cfg.n_residual_codebooks
    return bitrate(cfg.sample_rate / cfg.samples_per_frame, sizes)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/codec.json"))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see above)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny-seconds", type=float, default=10.0)
    parser.add_argument("--s2pro-seconds", type=float, default=2.0)
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each tiny measurement")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs of each tiny measurement")
    parser.add_argument("--s2pro-warmup", type=int, default=1)
    parser.add_argument("--s2pro-repeats", type=int, default=5, help="timed runs of each s2pro forward")
    args = parser.parse_args()
    if min(args.warmup, args.s2pro_warmup, args.repeats, args.s2pro_repeats) < 1:
        parser.error("--warmup, --s2pro-warmup, --repeats and --s2pro-repeats must be at least 1")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # audiotools' torch.jit.script and pkg_resources warnings
            import dac
    except ImportError as error:
        sys.exit(
            f"benchmarks/codec.py compares against descript-audio-codec, and `import dac` failed ({error}).\n"
            f"Install it without its protobuf<3.20 pin (see the top of benchmarks/codec.py):\n{INSTALL}"
        )

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(args.seed)
    report: dict = {
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dac": getattr(dac, "__version__", "?"),
        "seed": args.seed,
        "batch": 1,
        "timing": "median seconds; ours and DAC alternate run by run",
    }

    # tiny vs a DAC of the same sizes, encode and decode ------------------------------------------
    cfg = tiny()
    ours = Codec(cfg).eval()
    base = dac_like(cfg, dac).eval()
    length = int(args.tiny_seconds * cfg.sample_rate)
    wav = (0.1 * torch.randn(1, 1, length)).clamp(-1, 1)
    audio_s = length / cfg.sample_rate
    with torch.inference_mode():
        enc = paired_medians(
            lambda: ours.encode(wav, cfg.sample_rate),
            lambda: base.encode(base.preprocess(wav, cfg.sample_rate))[1],
            args.warmup,
            args.repeats,
        )
        codes, base_codes = enc[4:]  # (1, K, T / 640) and (1, K, T / 160)
        dec = paired_medians(
            lambda: ours.decode(codes),
            lambda: base.decode(base.quantizer.from_codes(base_codes)[0]),
            args.warmup,
            args.repeats,
        )
    tiny_row = {
        "audio_s": audio_s,
        "sample_rate": cfg.sample_rate,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "ours_params": n_params(ours),
        "ours_params_by_part": params_by_part(ours),
        "dac_params": n_params(base),
        "dac_params_by_part": params_by_part(base),
        "ours_frame_rate_hz": ours.frame_rate,
        "dac_frame_rate_hz": cfg.sample_rate / cfg.hop_length,
        "ours_codes": list(codes.shape[1:]),
        "dac_codes": list(base_codes.shape[1:]),
        "ours_bps": ours_bitrate(cfg),
        "dac_bps": bitrate(cfg.sample_rate / cfg.hop_length, [cfg.codebook_size] * cfg.n_codebooks),
        "dac_config": {
            "encoder_dim": cfg.encoder_dim,
            "encoder_rates": cfg.encoder_rates,
            "decoder_dim": cfg.decoder_dim,
            "decoder_rates": cfg.decoder_rates,
            "n_codebooks": cfg.n_codebooks,
            "codebook_size": cfg.codebook_size,
            "codebook_dim": cfg.codebook_dim,
            "sample_rate": cfg.sample_rate,
        },
    }
    for name, measured in (("encode", enc), ("decode", dec)):
        tiny_row[name] = timing_row(audio_s, measured)
        print(f"tiny {name}: {summary(tiny_row[name])}")
    report["tiny_vs_dac_same_size"] = tiny_row
    del ours, base

    # s2pro vs DAC 44.1 kHz, forward --------------------------------------------------------------
    cfg = s2pro()
    torch.manual_seed(args.seed)
    ours = Codec(cfg).eval()
    base = dac.model.DAC().eval()  # the defaults are the released 44.1 kHz configuration
    length = int(args.s2pro_seconds * cfg.sample_rate)
    wav = (0.1 * torch.randn(1, 1, length)).clamp(-1, 1)
    audio_s = length / cfg.sample_rate
    with torch.inference_mode():
        fwd = paired_medians(
            lambda: ours(wav), lambda: base(wav, cfg.sample_rate), args.s2pro_warmup, args.s2pro_repeats
        )
    ours_codes, base_codes = fwd[4]["codes"], fwd[5]["codes"]
    s2pro_row = {
        "audio_s": audio_s,
        "sample_rate": cfg.sample_rate,
        "warmup": args.s2pro_warmup,
        "repeats": args.s2pro_repeats,
        "ours_params": n_params(ours),
        "ours_params_by_part": params_by_part(ours),
        "dac_params": n_params(base),
        "dac_params_by_part": params_by_part(base),
        "ours_frame_rate_hz": round(ours.frame_rate, 2),
        "dac_frame_rate_hz": round(cfg.sample_rate / base.hop_length, 2),
        "ours_codes": list(ours_codes.shape[1:]),
        "dac_codes": list(base_codes.shape[1:]),
        "ours_bps": ours_bitrate(cfg),
        "dac_bps": bitrate(cfg.sample_rate / base.hop_length, [base.codebook_size] * base.n_codebooks),
        "forward": timing_row(audio_s, fwd),
    }
    print(f"s2pro forward: {summary(s2pro_row['forward'])}")
    print(f"params: tiny {tiny_row['ours_params']} vs {tiny_row['dac_params']}, ", end="")
    print(f"s2pro {s2pro_row['ours_params']} vs {s2pro_row['dac_params']}")
    report["s2pro_vs_dac_44khz"] = s2pro_row

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
