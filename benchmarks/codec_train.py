"""Speed of a codec training step: the real ``stage=codec`` path against a plain PyTorch loop, and the
two pieces of it that the stage makes cheap (the crop reader and the optimizer), each against the
obvious way, in one process.

- **step**: the ``demo`` codec preset trained twice from the same initial weights (``--seed``) on the
  same crops. Ours: ``CodecModule`` inside ``L.Trainer`` (CPU, a CSV logger as the stage has, no
  checkpoints), fed by a ``DataLoader`` over ``CropStream``, which reads every crop from the FLAC
  shards. Plain: a loop over the same crops, read into memory before timing, that runs the module's
  losses (``reconstruction_terms``), ``clip_grad_norm_``, the same fused AdamW and ``lr_factor``
  schedule, and the same codebook init and restarts (``tend_codebooks``). ``ratio`` = ours / plain in steps per second (below 1:
  the framework, the logging and the data reading cost that fraction). The first ``--warmup`` steps of
  each run are not timed; the quantizer is on from step ``--vq-start``.
- **crop**: ``read_crop`` (decode only the crop's stretch of the FLAC) against ``read_audio`` and a
  slice (decode the whole utterance), on the shard's utterances of about ``--utterance-s`` seconds.
- **adamw**: one optimizer step over the demo codec's parameters with ``fused=True`` against the
  default per-tensor loop (``foreach`` is the default only on CUDA).

The shard is flite speech (voice awb) made in a temporary folder: ``--utterances`` utterances of
several sentences each, 16 kHz FLAC in one tar, as ``stage=clean`` writes them.

    python benchmarks/codec_train.py            # about 2 min, 1 thread
    python benchmarks/codec_train.py --threads 2  # on an idle machine, as the demo trains
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import soundfile as sf
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from data_pipeline.demo_corpus import synthesize
from s2train.models.codec import CodecConfig
from s2train.shards import write_tar
from s2train.training.codec_data import CropStream, index_shards, read_audio, read_crop
from s2train.training.codec_module import CodecModule, CodecTrainConfig, lr_factor

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = [
    "The morning train was late again, so we walked to the office.",
    "Please put the green box on the table near the window.",
    "My brother likes to cook rice and beans on Sunday evenings.",
    "We planted three small trees behind the old school last spring.",
    "The library opened at nine and closes early on Fridays.",
    "Can you tell me how long the journey takes by bus?",
]


class Clock(L.Callback):
    """The time at the end of every batch."""

    def __init__(self):
        self.start, self.ends = 0.0, []

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())


def make_shard(folder: Path, utterances: int, seconds: float) -> Path:
    """``utterances`` flite recordings of about ``seconds`` each as ``clean-000000.tar``."""
    members = []
    for i in range(utterances):
        parts, total = [], 0
        while total < seconds * 16000:
            parts.append(synthesize("awb", SENTENCES[(i + len(parts)) % len(SENTENCES)], 16000))
            total += len(parts[-1])
        buffer = io.BytesIO()
        sf.write(buffer, np.concatenate(parts), 16000, format="FLAC", subtype="PCM_16")
        members.append((f"utt{i:03d}.flac", buffer.getvalue()))
    write_tar(folder / "shards" / "clean-000000.tar", members)
    return folder / "shards"


def step_times(ends: list[float], start: float, warmup: int) -> list[float]:
    return [b - a for a, b in zip([start, *ends[:-1]], ends)][warmup:]


def new_module(codec: CodecConfig, train: CodecTrainConfig, run_dir: Path, seed: int) -> CodecModule:
    torch.manual_seed(seed)
    return CodecModule(codec, train, run_dir, {})


def run_ours(codec, train, items, seed, run_dir: Path, warmup: int) -> list[float]:
    module = new_module(codec, train, run_dir, seed)
    crops = CropStream(items, codec.sample_rate, round(train.segment_s * codec.sample_rate), seed)
    clock = Clock()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=train.max_steps,
        log_every_n_steps=train.log_every,
        logger=CSVLogger(str(run_dir), name="logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
        default_root_dir=str(run_dir),
    )
    trainer.fit(module, DataLoader(crops, batch_size=train.batch_size))
    return step_times(clock.ends, clock.start, warmup)


def run_plain(codec, train, items, seed, run_dir: Path, warmup: int) -> list[float]:
    module = new_module(codec, train, run_dir, seed)
    crops = iter(
        DataLoader(
            CropStream(items, codec.sample_rate, round(train.segment_s * codec.sample_rate), seed),
            batch_size=train.batch_size,
        )
    )
    batches = [next(crops) for _ in range(train.max_steps)]  # read before timing: no data cost below
    model = module.codec.train()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=train.lr, betas=(0.8, 0.99), fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, train))
    start, ends = time.perf_counter(), []
    for step, wav in enumerate(batches, start=1):
        out = model(wav, bypass_quantizer=step - 1 < module.vq_start)
        terms = module.reconstruction_terms(wav, out)
        total = sum(module.loss_weights[name] * value for name, value in terms.items())
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        optimizer.step()
        schedule.step()
        module.tend_codebooks(step)
        ends.append(time.perf_counter())
    return step_times(ends, start, warmup)


def time_calls(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_crops(items, segment: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)

    def whole():
        for item in items:
            wav = read_audio(item, 16000)
            start = int(rng.integers(0, len(wav) - segment + 1))
            wav[start : start + segment].copy()

    def cropped():
        for item in items:
            read_crop(item, 16000, segment, rng)

    ours, baseline = time_calls(cropped, repeats) / len(items), time_calls(whole, repeats) / len(items)
    return {"read_crop_ms": 1000 * ours, "whole_decode_ms": 1000 * baseline, "ratio": baseline / ours}


def bench_adamw(codec: CodecConfig, repeats: int) -> dict:
    torch.manual_seed(0)
    params = list(new_module(codec, CodecTrainConfig(), Path(tempfile.gettempdir()), 0).codec.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    times = {}
    for name, kwargs in (("fused", {"fused": True}), ("per_tensor", {"foreach": False})):
        optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.8, 0.99), **kwargs)
        times[name] = time_calls(optimizer.step, repeats)
    return {
        "fused_ms": 1000 * times["fused"],
        "per_tensor_ms": 1000 * times["per_tensor"],
        "ratio": times["per_tensor"] / times["fused"],
        "parameters": sum(p.numel() for p in params),
        "tensors": len(params),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=120, help="timed steps of each training run")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps before them")
    parser.add_argument("--vq-start", type=int, default=10, help="the quantizer is bypassed before it")
    parser.add_argument("--utterances", type=int, default=6)
    parser.add_argument("--utterance-s", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "codec_train.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")

    codec = CodecConfig(**yaml.safe_load((ROOT / "conf" / "codec" / "demo.yaml").read_text()))
    train = CodecTrainConfig(
        batch_size=4,
        lr=1e-3,
        max_steps=args.warmup + args.steps,
        warmup_steps=args.vq_start,
        grad_clip=100.0,
        dead_code_every=20,
        log_every=25,
        preview_every=0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        items = index_shards(make_shard(tmp, args.utterances, args.utterance_s))
        audio_s = sum(len(read_audio(u, 16000)) for u in items) / 16000 / len(items)
        segment = round(train.segment_s * codec.sample_rate)
        crops = bench_crops(items, segment, args.repeats)
        adamw = bench_adamw(codec, args.repeats)
        plain = run_plain(codec, train, items, args.seed, tmp / "plain", args.warmup)
        ours = run_ours(codec, train, items, args.seed, tmp / "ours", args.warmup)
    ours_sps, plain_sps = 1 / statistics.median(ours), 1 / statistics.median(plain)
    result = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "codec": "demo",
        "batch": f"{train.batch_size} x {train.segment_s} s",
        "step": {
            "timed_steps": args.steps,
            "ours_steps_per_s": round(ours_sps, 3),
            "plain_steps_per_s": round(plain_sps, 3),
            "ratio": round(ours_sps / plain_sps, 3),
        },
        "crop": {"utterance_s": round(audio_s, 1), **{k: round(v, 3) for k, v in crops.items()}},
        "adamw": {k: round(v, 3) if isinstance(v, float) else v for k, v in adamw.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
