"""Audio decoding in bounded memory: any format soundfile reads, from a path, bytes or an array.

Shapes: ``[N]`` mono samples, ``[N, C]`` interleaved channels. Everything returned is float32 mono in
[-1, 1]; channels are averaged (a stereo file is kept, as one channel) and sample rates are changed
with soxr.
"""

from __future__ import annotations

import io
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr


class AudioReader(ABC):
    """Random access to one recording's frames at its native rate."""

    sample_rate: int
    channels: int
    frames: int

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate

    @abstractmethod
    def read(self, start: int, count: int) -> np.ndarray:
        """Frames ``start .. start + count`` as float32 ``(count, C)``."""

    def close(self) -> None:
        pass


class SoundFileReader(AudioReader):
    """A file on disk or in memory, decoded block by block by libsndfile."""

    def __init__(self, file: str | Path | bytes):
        # a path goes to libsndfile as bytes, so names that are not UTF-8 open too
        self._file = sf.SoundFile(io.BytesIO(file) if isinstance(file, bytes) else os.fsencode(file))
        self.sample_rate = self._file.samplerate
        self.channels = self._file.channels
        self.frames = self._file.frames
        if self.frames <= 0 and self._file.seekable():
            # some containers (mp3, ogg) do not announce their length: count it once, block by block
            self.frames = sum(len(b) for b in self._file.blocks(blocksize=1 << 16, dtype="float32"))

    def read(self, start: int, count: int) -> np.ndarray:
        self._file.seek(start)
        return self._file.read(count, dtype="float32", always_2d=True)

    def close(self) -> None:
        self._file.close()


class ArrayReader(AudioReader):
    """Audio a dataset has already decoded."""

    def __init__(self, samples: np.ndarray, sample_rate: int):
        samples = np.asarray(samples, dtype=np.float32)
        self._samples = samples[:, None] if samples.ndim == 1 else samples
        self.sample_rate = int(sample_rate)
        self.channels = self._samples.shape[1]
        self.frames = self._samples.shape[0]

    def read(self, start: int, count: int) -> np.ndarray:
        return self._samples[start : start + count]


def to_mono(block_NC: np.ndarray) -> np.ndarray:
    return block_NC.mean(axis=1) if block_NC.shape[1] > 1 else block_NC[:, 0]


def resample(samples: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    if sr_in == sr_out:
        return samples.astype(np.float32, copy=False)
    return soxr.resample(samples, sr_in, sr_out, quality="HQ").astype(np.float32, copy=False)


def read_mono(path: str | Path, sample_rate: int) -> np.ndarray:
    """A whole audio file as float32 mono (channels averaged) at ``sample_rate``."""
    samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    return resample(to_mono(samples), rate, sample_rate)


def stream_mono(reader: AudioReader, sample_rate: int, block_s: float) -> Iterator[np.ndarray]:
    """The whole recording as consecutive mono blocks at ``sample_rate``; memory is one block."""
    block = max(1, int(block_s * reader.sample_rate))
    resampler = None
    if reader.sample_rate != sample_rate:
        resampler = soxr.ResampleStream(reader.sample_rate, sample_rate, 1, dtype="float32", quality="HQ")
    for start in range(0, reader.frames, block):
        mono = to_mono(reader.read(start, min(block, reader.frames - start)))
        last = start + block >= reader.frames
        yield resampler.resample_chunk(mono, last=last) if resampler else mono
    if reader.frames == 0 and resampler:
        yield resampler.resample_chunk(np.zeros(0, np.float32), last=True)


@dataclass
class Excerpt:
    """One stretch of a recording, at the native rate and at the two rates the pipeline needs."""

    native: np.ndarray  # (N,) mono at the file's rate: clipping and bandwidth are measured here
    native_rate: int
    out: np.ndarray  # (N_out,) at the shard rate
    judge: np.ndarray  # (N_16k,) at the judges' rate

    def cut(self, start_s: float, end_s: float, out_rate: int, judge_rate: int) -> Excerpt:
        """The stretch from ``start_s`` to ``end_s`` seconds into this excerpt, at each of its rates
        (nothing is read or resampled again)."""

        def part(x: np.ndarray, rate: int) -> np.ndarray:
            return x[int(round(start_s * rate)) : int(round(end_s * rate))]

        return Excerpt(
            part(self.native, self.native_rate),
            self.native_rate,
            part(self.out, out_rate),
            part(self.judge, judge_rate),
        )


def read_excerpt(
    reader: AudioReader, start_s: float, end_s: float, out_rate: int, judge_rate: int
) -> Excerpt:
    start = max(0, int(round(start_s * reader.sample_rate)))
    stop = min(reader.frames, int(round(end_s * reader.sample_rate)))
    native = to_mono(reader.read(start, stop - start))
    return Excerpt(
        native=native,
        native_rate=reader.sample_rate,
        out=resample(native, reader.sample_rate, out_rate),
        judge=resample(native, reader.sample_rate, judge_rate),
    )


def flac_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """Mono 16-bit FLAC, as the clean-shard contract stores audio."""
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(samples, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()
