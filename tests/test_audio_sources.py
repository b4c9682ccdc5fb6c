"""Decoding in bounded memory, and the three kinds of input: folder, saved HF dataset, webdataset tars."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import soundfile as sf

from data_pipeline.sources import DataConfig, list_items
from s2train.audio import ArrayReader, SoundFileReader, flac_bytes, read_excerpt, resample, stream_mono


def tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return mono if channels == 1 else np.stack([mono] * channels, axis=1)


def test_streamed_resampling_matches_one_shot(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, tone(7.3, 44100, channels=2), 44100, subtype="FLOAT")
    reader = SoundFileReader(path)
    assert reader.channels == 2 and reader.duration == pytest.approx(7.3, abs=1e-3)
    whole = resample(tone(7.3, 44100), 44100, 16000)
    streamed = np.concatenate(list(stream_mono(reader, 16000, block_s=0.9)))
    assert abs(len(streamed) - len(whole)) <= 1
    n = min(len(streamed), len(whole))
    np.testing.assert_allclose(streamed[100 : n - 100], whole[100 : n - 100], atol=2e-3)


def test_excerpts_come_at_every_rate_and_flac_round_trips():
    reader = ArrayReader(tone(5.0, 22050, channels=2), 22050)
    ex = read_excerpt(reader, 1.0, 3.5, out_rate=44100, judge_rate=16000)
    assert len(ex.native) == int(2.5 * 22050) and ex.native_rate == 22050
    assert abs(len(ex.out) - 2.5 * 44100) <= 2 and abs(len(ex.judge) - 2.5 * 16000) <= 2
    data = flac_bytes(ex.out, 44100)
    back, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == 44100 and sf.info(io.BytesIO(data)).subtype == "PCM_16"
    np.testing.assert_allclose(back, ex.out, atol=1 / 32767 + 1e-6)


def test_folder_source_reads_metadata_jsonl(tmp_path):
    (tmp_path / "sub").mkdir()
    sf.write(tmp_path / "sub" / "b.flac", tone(1.0, 16000), 16000)
    sf.write(tmp_path / "a.wav", tone(1.0, 8000), 8000)
    (tmp_path / "notes.txt").write_text("not audio")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "sub/b.flac", "language": "de", "speaker": 7}) + "\n"
    )
    items = list_items(DataConfig(path=str(tmp_path), lang="en"))
    assert [i.source for i in items] == ["a.wav", "sub/b.flac"]
    assert (items[0].lang, items[1].lang, items[1].speaker) == ("en", "de", "7")
    assert items[0].open().sample_rate == 8000


def test_hf_dataset_saved_on_disk(tmp_path):
    import datasets

    buf = io.BytesIO()
    sf.write(buf, tone(2.0, 24000), 24000, format="FLAC")
    ds = datasets.Dataset.from_dict(
        {"audio": [{"bytes": buf.getvalue(), "path": None}], "text": ["hello"], "language": ["en"]}
    ).cast_column("audio", datasets.Audio())
    ds.save_to_disk(str(tmp_path / "ds"))
    [item] = list_items(DataConfig(source="hf", path=str(tmp_path / "ds")))
    reader = item.open()
    assert reader.sample_rate == 24000 and reader.frames == 48000
    assert (item.text, item.lang) == ("hello", "en")
    with pytest.raises(ValueError, match="no column"):
        list_items(DataConfig(source="hf", path=str(tmp_path / "ds"), audio_column="wav"))


def test_webdataset_tars(tmp_path):
    shard = tmp_path / "in-000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, rate in (("utt_a", 16000), ("utt_b", 22050)):
            buf = io.BytesIO()
            sf.write(buf, tone(1.5, rate), rate, format="WAV")
            for name, payload in (
                (f"{key}.wav", buf.getvalue()),
                (f"{key}.json", json.dumps({"lang": "es"}).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    items = list_items(DataConfig(source="webdataset", path=str(tmp_path)))
    assert [i.source for i in items] == ["in-000.tar/utt_a", "in-000.tar/utt_b"]
    assert all(i.lang == "es" for i in items)
    assert items[1].open().sample_rate == 22050


def test_bad_inputs_are_explained(tmp_path):
    with pytest.raises(ValueError, match="data.path is required"):
        list_items(DataConfig())
    with pytest.raises(ValueError, match="is not a folder"):
        list_items(DataConfig(path=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="no .tar files"):
        list_items(DataConfig(source="webdataset", path=str(tmp_path)))
    with pytest.raises(ValueError, match="data.partition"):
        DataConfig(partition=2, num_partitions=2)


def test_a_long_file_streams_in_bounded_memory(tmp_path):
    import tracemalloc

    path = tmp_path / "long.flac"
    rate, minutes = 16000, 20
    with sf.SoundFile(path, "w", rate, 1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(minutes):
            f.write(tone(60.0, rate))
    reader = SoundFileReader(path)
    assert reader.duration == pytest.approx(minutes * 60, abs=0.01)
    tracemalloc.start()
    samples = 0
    for block in stream_mono(reader, 16000, block_s=10.0):
        samples += len(block)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    whole = minutes * 60 * rate * 4  # the file as float32: 77 MB
    assert samples == minutes * 60 * rate
    assert peak < whole / 20, f"peak {peak / 1e6:.1f} MB while streaming a {whole / 1e6:.0f} MB file"
