"""``stage=tokenize``: clean shards -> token shards, with a codec.

Each clean shard is one unit: its utterances are decoded, resampled to the codec's rate (soxr),
encoded in length-sorted batches and written as ``shards/tokens-<u>.tar`` with ``{key}.codes.npy``
(uint16 ``[K, T]``) and ``{key}.json`` (the clean metadata plus ``codec``, ``frame_rate``, ``frames``).
Audio is never rewritten. Units, partitions (``data.partition``/``data.num_partitions``, one SLURM
array task each) and resume work as in the clean stage (``data_pipeline.shards``).

    python -m s2train stage=tokenize name=mycorpus tokenize.codec=runs/mycorpus/codec/codec.pt
    python -m s2train stage=tokenize tokenize.codec=/models/s2-pro   # the released codec.pth folder
    sbatch --array=0-31 slurm/tokenize_array.sbatch name=mycorpus tokenize.codec=...
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from data_pipeline.shards import UnitLedger
from s2train.audio import resample
from s2train.checkpoints import codec_files, open_codec
from s2train.checks import check
from s2train.models.codec import Codec
from s2train.runs import stage_input, write_json_atomic, write_text_atomic
from s2train.shards import read_tar, write_tar

if TYPE_CHECKING:
    from s2train.config import S2Config


@dataclass
class TokenizeConfig:
    codec: str | None = (
        None  # our codec checkpoint (the codec.pt of stage=codec) or a released S2 Pro codec folder
    )
    input: str | None = None  # a clean run directory; None: run_root/name/clean
    batch_size: int = 8  # utterances encoded together (sorted by length, so padding stays small)
    progress: bool = True

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "tokenize.batch_size must be at least 1")


def codec_digest(spec: str) -> str:
    """sha256 (16 hex digits) of the files the codec is loaded from, read in 1 MiB pieces: a released
    folder's other files (the language model's weights) are not read."""
    digest = hashlib.sha256()
    for f in codec_files(spec):
        digest.update(f.name.encode())
        with open(f, "rb") as stream:
            for piece in iter(lambda: stream.read(1 << 20), b""):
                digest.update(piece)
    return digest.hexdigest()[:16]


@torch.inference_mode()
def encode_unit(codec: Codec, samples: dict[str, dict[str, bytes]], batch_size: int) -> dict[str, np.ndarray]:
    """Codes ``[K, T]`` (uint16) of every utterance in a shard; T = ceil(samples / samples_per_frame)."""
    rate = codec.config.sample_rate
    audio = {}
    for key, members in samples.items():
        wav, sr = sf.read(io.BytesIO(members["flac"]), dtype="float32", always_2d=True)
        audio[key] = resample(wav.mean(axis=1), sr, rate)
    codes: dict[str, np.ndarray] = {}
    order = sorted(audio, key=lambda k: len(audio[k]))
    for first in range(0, len(order), batch_size):
        keys = order[first : first + batch_size]
        longest = max(len(audio[k]) for k in keys)
        batch = torch.zeros(len(keys), 1, longest)
        for i, k in enumerate(keys):
            batch[i, 0, : len(audio[k])] = torch.from_numpy(audio[k])
        batch_codes = codec.encode(
            batch, rate
        )  # (B, K, T); causal, so the right padding changes nothing before it
        for i, k in enumerate(keys):
            frames = math.ceil(len(audio[k]) / codec.samples_per_frame)
            codes[k] = batch_codes[i, :, :frames].numpy().astype(np.uint16)
    return codes


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def run(cfg: S2Config) -> dict:
    run_dir = Path(cfg.run_dir)
    clean_dir = stage_input(cfg, "clean", cfg.tokenize.input)
    shards = sorted((clean_dir / "shards").glob("*.tar"))
    if not shards:
        raise ValueError(
            f"no clean shards in {clean_dir / 'shards'}: run stage=clean first or set tokenize.input"
        )
    codec, codec_name = open_codec(cfg.tokenize.codec)
    if max(codec.config.semantic_codebook_size, codec.config.codebook_size) > 2**16:
        raise ValueError("codebooks larger than 65536 entries do not fit the uint16 token shards")
    plan = {
        # where the clean run lies from this one, so that a tree of runs moved (or copied) together resumes
        "clean": os.path.relpath(clean_dir.resolve(), run_dir.resolve()),
        "shards": [s.name for s in shards],
        "codec": codec_name,
        "codec_sha256": codec_digest(cfg.tokenize.codec),
    }
    plan_file = run_dir / "plan.json"
    before = json.loads(plan_file.read_text()) if plan_file.exists() else plan
    if before.get("clean") == str(clean_dir.resolve()):  # recorded as an absolute path before
        before["clean"] = plan["clean"]
    if before != plan:
        raise ValueError(
            f"{run_dir} holds a tokenize run of other shards or another codec; use another run_dir="
        )
    write_json_atomic(plan_file, plan)
    if cfg.judges.threads:
        torch.set_num_threads(cfg.judges.threads)
    ledger = UnitLedger(run_dir, len(shards), cfg.data.partition, cfg.data.num_partitions)
    todo = ledger.todo
    started, audio_s = time.perf_counter(), 0.0
    bar = tqdm(total=len(todo), unit="shard", desc="tokenize", disable=not cfg.tokenize.progress)
    for u in todo:
        samples = read_tar(shards[u])
        codes = encode_unit(codec, samples, cfg.tokenize.batch_size)
        name = f"tokens-{u:06d}.tar"
        rows, members = [], []
        for key, member in samples.items():
            meta = {
                **json.loads(member["json"]),
                "codec": codec_name,
                "frame_rate": codec.frame_rate,
                "frames": int(codes[key].shape[1]),
                "codebooks": int(codes[key].shape[0]),
            }
            members += [
                (f"{key}.codes.npy", _npy_bytes(codes[key])),
                (f"{key}.json", json.dumps(meta, ensure_ascii=False).encode()),
            ]
            rows.append(
                {k: meta[k] for k in ("id", "duration", "frames", "codebooks", "speaker", "lang", "text")}
                | {"shard": f"shards/{name}"}
            )
            audio_s += meta["duration"]
        write_tar(ledger.shards_dir / name, members)
        ledger.finish(u, {"shard": name, "source_shard": shards[u].name, "manifest": rows})
        bar.update(1)
        bar.set_postfix(audio=f"{audio_s:.0f}s", speed=f"{audio_s / (time.perf_counter() - started):.1f}x")
    bar.close()
    with ledger.merging():  # another partition may be merging its own end right now
        records = ledger.records()
        manifest = [row for r in records for row in r["manifest"]]
        write_text_atomic(
            run_dir / "manifest.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in manifest)
        )
        seconds = sum(r["duration"] for r in manifest)
        frames = sum(r["frames"] for r in manifest)
        stats = {
            "units_done": len(records),
            "units_total": len(shards),
            "complete": len(records) == len(shards),
            "utterances": len(manifest),
            "frames": frames,
            "hours": round(seconds / 3600, 4),
            "tokens_per_second_of_audio": round(frames * codec.config.n_codebooks / seconds, 2)
            if seconds
            else 0.0,
            "frame_rate": codec.frame_rate,
            "codebooks": codec.config.n_codebooks,
            # entries of each codebook: what a language model over these tokens must be able to predict
            "codebook_sizes": [codec.config.semantic_codebook_size]
            + [codec.config.codebook_size] * codec.config.n_residual_codebooks,
            "codec": codec_name,
        }
        write_json_atomic(run_dir / "stats.json", stats)
    wall = time.perf_counter() - started
    return {
        **stats,
        "this_run_audio_s": round(audio_s, 1),
        "this_run_x_realtime": round(audio_s / wall, 2) if audio_s else 0.0,
    }
