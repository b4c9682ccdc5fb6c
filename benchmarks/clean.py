"""Throughput of the clean stage, judge by judge, in seconds of audio per wall-clock second.

Each judge runs over the same good recordings of the demo corpus; where a stock way of running the
same model exists, it runs in the same process on the same audio and the ratio is reported:

- VAD: our streaming frame loop + region logic against silero-vad's ``get_speech_timestamps``.
- DNSMOS: our scorer (sessions made once) against ``speechmos.dnsmos.run``, window for window on
  9.01 s clips. (On longer audio speechmos, like the reference DNSMOS script it follows, computes
  ``int((idx + 9.01) * 16000)`` in floating point and silently skips the windows that come out one
  sample short, about 60% of them; ours scores every window, so whole-file timings are not comparable.)
- speaker: our batched windows against resemblyzer's ``embed_utterance(return_partials=True)``.

    python benchmarks/clean.py                 # builds the demo corpus under runs/bench if needed
    python benchmarks/clean.py --corpus DIR    # any folder of audio
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from omegaconf import OmegaConf

from s2train.audio import resample
from s2train.config import S2Config
from s2train.judges import JUDGE_RATE
from s2train.judges.suite import JudgeSuite


def timed(fn, *args, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/clean.json"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--asr-workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg: S2Config = OmegaConf.to_object(OmegaConf.structured(S2Config(stage="clean", name="bench")))
    if args.corpus is None:
        from data_pipeline import demo_corpus

        corpus_cfg = replace(cfg, stage="demo_corpus", run_dir="runs/bench/demo_corpus")
        args.corpus = Path(demo_corpus.run(corpus_cfg)["corpus"])
    files = sorted(p for p in args.corpus.glob("*.wav") if not p.name.startswith("bad_"))
    wavs = []
    for path in files:
        audio, rate = sf.read(path, dtype="float32", always_2d=True)
        wavs.append(resample(audio.mean(axis=1), rate, JUDGE_RATE))
    audio_s = sum(len(w) for w in wavs) / JUDGE_RATE
    judges = JudgeSuite(cfg.judges)  # the judges the clean stage uses, with its default config
    rows: dict[str, dict] = {}

    def record(
        name: str,
        ours_s: float,
        baseline_s: float | None = None,
        baseline: str | None = None,
        seconds_of_audio: float | None = None,
    ):
        audio = seconds_of_audio or audio_s
        row = {
            "audio_s": round(audio, 1),
            "seconds": round(ours_s, 3),
            "x_realtime": round(audio / ours_s, 2),
        }
        if baseline_s is not None:
            row |= {
                "baseline": baseline,
                "baseline_seconds": round(baseline_s, 3),
                "baseline_x_realtime": round(audio / baseline_s, 2),
                "speedup": round(baseline_s / ours_s, 3),
            }
        rows[name] = row
        print(f"{name:<28} {row}")

    # VAD ---------------------------------------------------------------------------------------
    from silero_vad import get_speech_timestamps

    from s2train.judges.vad import speech_regions

    vad = judges.vad
    ours, _ = timed(
        lambda: [speech_regions(vad.probabilities([w]), cfg.judges.vad, len(w) / JUDGE_RATE) for w in wavs]
    )
    base, _ = timed(
        lambda: [
            get_speech_timestamps(torch.from_numpy(w), vad.model, sampling_rate=JUDGE_RATE) for w in wavs
        ]
    )
    record("vad (silero)", ours, base, "silero_vad.get_speech_timestamps")

    # DNSMOS ------------------------------------------------------------------------------------
    from speechmos import dnsmos as speechmos_dnsmos

    from s2train.judges.quality import DNSMOS_WINDOW_S

    model = judges.dnsmos  # onnx_threads=0: onnxruntime picks its threads, as speechmos lets it
    model(wavs[0][:JUDGE_RATE], 1.0)  # warm the sessions, as a long run would be
    speechmos_dnsmos.run(wavs[0][:JUDGE_RATE], sr=JUDGE_RATE)
    window = int(DNSMOS_WINDOW_S * JUDGE_RATE)  # 144160 samples
    clips = [np.clip(w[:window], -1, 1) for w in wavs if len(w) >= window]
    ours, _ = timed(lambda: [model(c, 1.0) for c in clips])
    base, _ = timed(lambda: [speechmos_dnsmos.run(c, sr=JUDGE_RATE) for c in clips])
    record(
        "dnsmos, one 9.01 s window", ours, base, "speechmos.dnsmos.run", seconds_of_audio=9.01 * len(clips)
    )
    ours, _ = timed(lambda: [model(w, 1.0) for w in wavs])
    record("dnsmos hop 1 s (default)", ours)
    ours, _ = timed(lambda: [model(w, 9.01) for w in wavs])
    record("dnsmos hop 9.01 s (demo)", ours)

    # speaker -----------------------------------------------------------------------------------
    judge = judges.speaker
    judge([wavs[0][: 2 * JUDGE_RATE]])
    ours, _ = timed(lambda: judge(wavs))
    encoder = judge.embedder.encoder
    base, _ = timed(lambda: [encoder.embed_utterance(w, return_partials=True, rate=1 / 0.8) for w in wavs])
    record("speaker (resemblyzer)", ours, base, "resemblyzer embed_utterance(return_partials)")

    # ASR ---------------------------------------------------------------------------------------
    asr = judges.asr  # pocketsphinx
    ours, _ = timed(lambda: asr(wavs, ["en"] * len(wavs)))
    record("asr (pocketsphinx)", ours)
    # the same clips in judges.asr.workers processes (the demo's 2), one clip per task as in a batch
    # of a demo_report or a GRPO evaluation: the baseline is the one process above
    from s2train.judges.asr import ASRConfig, PocketSphinxASR

    pooled = PocketSphinxASR(ASRConfig(workers=args.asr_workers))
    pooled(wavs[:2], ["en", "en"])  # start the workers, as a long run does once
    clips = [c for w in wavs for c in np.array_split(w, max(1, len(w) // (4 * JUDGE_RATE)))]  # ~4 s
    single, alone = timed(lambda: asr(clips, ["en"] * len(clips)))
    workers, again = timed(lambda: pooled(clips, ["en"] * len(clips)))
    assert again == alone  # the same transcripts, word times and all
    record(f"asr, {args.asr_workers} workers, ~4 s clips", workers, single, "one process")

    # captioner ---------------------------------------------------------------------------------
    captioner = judges.captioner
    captioner.measure(wavs[0][: 2 * JUDGE_RATE], "warm up", 2.0)  # numba compiles pYIN's kernels once
    ours, _ = timed(lambda: [captioner.measure(w, "", len(w) / JUDGE_RATE) for w in wavs])
    record("captioner (pyin, lufs)", ours)

    # the whole stage ---------------------------------------------------------------------------
    from data_pipeline import clean

    with tempfile.TemporaryDirectory() as tmp:
        stage_cfg = replace(
            cfg,
            run_dir=tmp,
            data=replace(cfg.data, path=str(args.corpus)),
            clean=replace(cfg.clean, sample_rate=16000, progress=False),
            judges=replace(
                cfg.judges, quality=replace(cfg.judges.quality, dnsmos_ovrl_min=0.0, dnsmos_hop_s=9.01)
            ),
        )
        start = time.perf_counter()
        result = clean.run(stage_cfg)
        whole = time.perf_counter() - start
    all_audio = result["input_h"] * 3600
    rows["whole stage"] = {
        "seconds": round(whole, 2),
        "audio_s": round(all_audio, 1),
        "x_realtime": round(all_audio / whole, 2),
        "note": "all files, bad ones included; DNSMOS hop 9.01 s as in the demo",
    }
    print(f"{'whole stage':<28} {rows['whole stage']}")

    report = {
        "audio_s": round(audio_s, 1),
        "files": len(files),
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "judges": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
