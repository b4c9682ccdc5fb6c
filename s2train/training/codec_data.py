"""Codec training data: random fixed-length crops of the utterances in a clean run's shards.

The shards are indexed once (tar headers only); a utterance's FLAC is read by seeking to its payload.
A few utterances are set aside by a hash of their key (the same ones on every run of one corpus) for
reconstruction previews and the final held-out score; they are never cropped for training.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from s2train.audio import resample


@dataclass(frozen=True)
class Utterance:
    """Where one ``{key}.flac`` lies: its shard and the byte range of its payload."""

    shard: Path
    key: str
    offset: int
    size: int


def index_shards(shards_dir: Path) -> list[Utterance]:
    """Every ``.flac`` member of the ``*.tar`` shards in ``shards_dir``, in shard and tar order."""
    items = []
    for shard in sorted(Path(shards_dir).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                if member.isfile() and ext == "flac":
                    items.append(Utterance(shard, key, member.offset_data, member.size))
    return items


def split_heldout(items: list[Utterance], n_heldout: int) -> tuple[list[Utterance], list[Utterance]]:
    """``(train, heldout)``: the ``n_heldout`` utterances whose key hashes lowest are held out."""
    if len(items) <= n_heldout:
        raise ValueError(
            f"the clean shards hold {len(items)} utterances: too few to hold out "
            f"codec_train.heldout_items={n_heldout} and still train; add data or lower heldout_items"
        )
    ranked = sorted(items, key=lambda u: hashlib.sha1(u.key.encode()).hexdigest())
    heldout = {u.key for u in ranked[:n_heldout]}
    return [u for u in items if u.key not in heldout], ranked[:n_heldout]


def read_metadata(item: Utterance) -> dict:
    """The clean metadata ``{key}.json`` beside an utterance's audio in its shard."""
    with tarfile.open(item.shard) as tar:
        member = tar.extractfile(f"{item.key}.json")
        if member is None:
            raise ValueError(f"{item.shard} has no {item.key}.json beside {item.key}.flac")
        return json.load(member)


def _payload(item: Utterance) -> io.BytesIO:
    with open(item.shard, "rb") as f:
        f.seek(item.offset)
        return io.BytesIO(f.read(item.size))


def read_audio(item: Utterance, sample_rate: int) -> np.ndarray:
    """One utterance as float32 mono samples (T,) at ``sample_rate`` (soxr when the shard's rate differs)."""
    wav, rate = sf.read(_payload(item), dtype="float32", always_2d=True)
    return resample(wav.mean(axis=1), rate, sample_rate)


def read_crop(item: Utterance, sample_rate: int, segment: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``segment``-sample stretch of one utterance at ``sample_rate`` (zero-padded when it is
    shorter). Only the stretch is decoded: FLAC seeks to it, so a crop costs the same whatever the
    utterance's length."""
    with sf.SoundFile(_payload(item)) as f:
        rate, frames = f.samplerate, f.frames
        need = -(-segment * rate // sample_rate)  # source samples that resample to ``segment``
        if frames > need:
            f.seek(int(rng.integers(0, frames - need + 1)))
        wav = f.read(min(need, frames), dtype="float32", always_2d=True)
    wav = resample(wav.mean(axis=1), rate, sample_rate)[:segment]
    return np.pad(wav, (0, segment - len(wav)))


class CropStream(IterableDataset):
    """An endless stream of random crops (1, segment_samples), zero-padded when a utterance is shorter.

    Utterance ``i`` belongs to reader ``i % readers``, one reader per dataloader worker; each
    reader visits its utterances in a fresh random order every pass. Crops depend only on ``seed``,
    ``stream`` and the reader: the stage passes the step a run starts from as ``stream``, so a resumed
    run draws new crops rather than repeating the first run's.
    """

    def __init__(
        self, items: list[Utterance], sample_rate: int, segment_samples: int, seed: int, stream: int = 0
    ):
        if not items:
            raise ValueError("no utterances to train the codec on")
        self.items, self.sample_rate, self.segment = items, sample_rate, segment_samples
        self.seed, self.stream = seed, stream

    def _reader(self) -> tuple[int, int]:
        worker = get_worker_info()
        return (worker.id, worker.num_workers) if worker else (0, 1)

    def __iter__(self) -> Iterator[Tensor]:
        reader, readers = self._reader()
        mine = [u for i, u in enumerate(self.items) if i % readers == reader % len(self.items)]
        rng = np.random.default_rng([self.seed, self.stream, reader])
        while True:
            for i in rng.permutation(len(mine)):
                wav = read_crop(mine[i], self.sample_rate, self.segment, rng)
                yield torch.from_numpy(np.ascontiguousarray(wav))[None]  # (1, segment)
