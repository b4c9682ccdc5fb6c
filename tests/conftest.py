"""Shared fixtures: the demo corpus and one uninterrupted clean run over it, made once per session
through the real CLI, exactly as a user runs them."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from s2train.audio import flac_bytes
from s2train.config import S2Config, register_configs
from s2train.shards import write_tar

ROOT = Path(__file__).resolve().parent.parent
# experiment=demo as the README runs it, but with a few training steps instead of minutes of them
DEMO_SHORT = [
    "demo_corpus.sentences_per_voice=3",
    "clean.files_per_shard=2",  # many small units, so the kill-and-resume tests can stop between them
    "codec_train.max_steps=16",
    "codec_train.preview_every=8",
    "codec_train.checkpoint_every=8",
    "train.max_steps=12",
    "train.warmup_steps=2",
    "train.checkpoint_every=6",
    "train.progress=false",
    "sft.train.max_steps=6",
    "sft.train.warmup_steps=2",
    "sft.train.checkpoint_every=3",
    "sft.train.progress=false",
    "synthesize.max_new_tokens=40",
    "synthesize.progress=false",
    "demo_report.seen=2",
    "demo_report.heldout=1",
    "demo_report.caption_texts=1",
    "demo_report.caption_seeds=2",
    "demo_report.max_new_tokens=30",
    "finetune.train.max_steps=6",
    "finetune.train.warmup_steps=2",
    "finetune.train.checkpoint_every=3",
    "finetune.train.progress=false",
    "preference.max_steps=60",
    "preference.progress=false",
    "grpo.train.max_steps=2",
    "grpo.train.progress=false",
    "grpo.prompts_per_step=2",
    "grpo.group_size=2",
    "grpo.heldout_prompts=2",
    "grpo.eval_samples=1",
    "grpo.max_new_tokens=40",
    "grpo.long_prompts=true",  # every demo utterance is longer than 40 frames
]


def compose_config(*overrides: str) -> S2Config:
    """The typed config ``python -m s2train <overrides>`` would run with, composed in-process."""
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


def run_cli(*overrides: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m s2train <overrides>`` in a subprocess; returns the finished process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "s2train", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"s2train {' '.join(overrides)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return proc


def kill_when(overrides: list[str], ready, poll_s: float = 0.05) -> None:
    """Start ``python -m s2train <overrides>`` and SIGKILL it (and its children) as soon as ``ready()``
    holds; it must still be running then."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "s2train", *overrides],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(poll_s)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def kill_after_units(overrides: list[str], run_dir: Path, units: int, poll_s: float) -> dict[str, int]:
    """``kill_when`` ``units`` unit markers exist in ``run_dir/units``; returns the finished markers with
    their modification times."""
    markers = Path(run_dir) / "units"
    kill_when(overrides, lambda: len(list(markers.glob("[0-9]*.json"))) >= units, poll_s)
    return {p.name: p.stat().st_mtime_ns for p in markers.glob("[0-9]*.json")}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """``python -m s2train experiment=demo`` into a fresh run root: every stage of the demo (demo corpus,
    clean, codec, tokenize, pretrain, synthesize) on the demo corpus, with the two trainings cut to a few
    steps and the synthesised sentences to 40 frames."""
    root = tmp_path_factory.mktemp("runs")
    run_cli("experiment=demo", f"run_root={root}", *DEMO_SHORT)
    return root


@pytest.fixture(scope="session")
def demo_corpus(demo_root) -> Path:
    return demo_root / "demo" / "demo_corpus" / "corpus"


@pytest.fixture(scope="session")
def demo_clean(demo_root) -> Path:
    return demo_root / "demo" / "clean"


@pytest.fixture(scope="session")
def truth(demo_corpus) -> dict[str, dict]:
    return {row["file"]: row for row in read_jsonl(demo_corpus / "truth.jsonl")}


@pytest.fixture(scope="session")
def flite_wav(tmp_path_factory):
    """Synthesise one flite sentence at 16 kHz: ``flite_wav(voice, text) -> np.ndarray``."""
    from data_pipeline.demo_corpus import synthesize

    cache: dict[tuple[str, str], object] = {}

    def make(speaker: str, text: str):
        if (speaker, text) not in cache:
            cache[speaker, text] = synthesize(speaker, text, 16000)
        return cache[speaker, text]

    return make


@pytest.fixture(scope="session")
def codec_file(tmp_path_factory):
    """A random-weight ``tiny`` codec checkpoint (25 Hz, 1 x 64 + 3 x 32 codes)."""
    import torch

    from s2train.checkpoints import save_codec
    from s2train.models.codec import Codec, tiny

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("codec") / "codec.pt"
    save_codec(Codec(tiny()).eval(), path)
    return path


@pytest.fixture(scope="session")
def tokenized(demo_root, codec_file, tmp_path_factory):
    """``stage=tokenize`` of the demo's clean shards with ``codec_file``: a tokenize run directory."""
    run_dir = tmp_path_factory.mktemp("tokenize") / "run"
    run_cli(
        "experiment=demo",
        "stage=tokenize",
        f"run_root={demo_root}",
        f"run_dir={run_dir}",
        f"tokenize.codec={codec_file}",
        "tokenize.batch_size=4",
        "tokenize.progress=false",
    )
    return run_dir


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def tiny_token_run(tmp_path_factory) -> Path:
    """A tokenize run directory of 12 random utterances of two speakers: 4 codebooks of 64 / 32 codes."""
    root = tmp_path_factory.mktemp("golden_tokens")
    rng = np.random.default_rng(1234)
    members = []
    for i in range(12):
        frames = int(rng.integers(20, 60))
        codes = np.concatenate([rng.integers(0, 64, (1, frames)), rng.integers(0, 32, (3, frames))])
        words = " ".join(f"w{int(x)}" for x in rng.integers(0, 50, int(rng.integers(3, 9))))
        meta = {"id": f"u{i:03d}", "speaker": f"spk{i % 2}", "text": words, "lang": "en", "duration": 1.0}
        members += [
            (f"u{i:03d}.codes.npy", _npy(codes.astype(np.uint16))),
            (f"u{i:03d}.json", json.dumps(meta).encode()),
        ]
    write_tar(root / "shards" / "tokens-000000.tar", members)
    (root / "stats.json").write_text(json.dumps({"codebook_sizes": [64, 32, 32, 32]}))
    return root


@pytest.fixture(scope="session")
def tiny_clean_run(tmp_path_factory) -> Path:
    """A clean run directory of four 1.5 s utterances of seeded harmonic tones in noise, at 16 kHz."""
    root = tmp_path_factory.mktemp("golden_clean")
    rng = np.random.default_rng(99)
    t = np.arange(24000) / 16000
    members = []
    for i in range(4):
        f0 = 110.0 + 40.0 * i
        wav = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 6)) * 0.2
        wav = (wav + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
        meta = {"id": f"c{i:03d}", "duration": 1.5, "sample_rate": 16000}
        members += [(f"c{i:03d}.flac", flac_bytes(wav, 16000)), (f"c{i:03d}.json", json.dumps(meta).encode())]
    write_tar(root / "shards" / "clean-000000.tar", members)
    return root


def model_logits(model, seed: int = 0):
    """A ``DualAR``'s slow logits on a random 12-position sequence whose last 6 positions are semantic, and
    its fast logits teacher-forced on those 6: what two models that compute the same function agree on."""
    import torch

    cfg, g, T = model.config, torch.Generator().manual_seed(seed), 12
    codes = torch.randint(0, cfg.residual_codebook_size, (1, cfg.num_codebooks, T), generator=g)
    tokens = torch.randint(0, 256, (1, 1, T), generator=g)
    tokens[0, 0, 6:] = cfg.semantic_begin_id + codes[0, 0, 6:] % cfg.codebook_size
    with torch.no_grad():
        out = model(torch.cat([tokens, codes], 1), torch.arange(T)[None], torch.zeros(1, T, dtype=torch.long))
        fast = model.fast_forward(out.hidden[0, 6:], codes[0, :, 6:].T)
    return out.logits, fast
