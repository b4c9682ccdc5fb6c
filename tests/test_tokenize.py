"""``stage=tokenize`` on the demo's clean shards: token shards follow the contract, batching changes no
code, and a killed run resumes without redoing or losing shards."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from s2train.checkpoints import load_codec, open_codec
from s2train.shards import read_tar
from tests.conftest import kill_after_units, read_jsonl, run_cli


def test_token_shards_follow_the_contract(tokenized, demo_clean, codec_file):
    codec = load_codec(codec_file)
    clean = {m["id"]: m for m in read_jsonl(demo_clean / "manifest.jsonl")}
    manifest = read_jsonl(tokenized / "manifest.jsonl")
    assert sorted(m["id"] for m in manifest) == sorted(clean)
    stats = json.loads((tokenized / "stats.json").read_text())
    assert stats["complete"] and stats["utterances"] == len(clean)
    assert stats["tokens_per_second_of_audio"] == pytest.approx(
        codec.frame_rate * codec.config.n_codebooks, rel=0.02
    )
    seen = 0
    for shard in sorted((tokenized / "shards").glob("*.tar")):
        for key, members in read_tar(shard).items():
            codes = np.load(io.BytesIO(members["codes.npy"]), allow_pickle=False)
            meta = json.loads(members["json"])
            assert codes.dtype == np.uint16 and codes.shape[0] == codec.config.n_codebooks
            expected = math.ceil(round(clean[key]["duration"] * 16000) / codec.samples_per_frame)
            assert abs(codes.shape[1] - expected) <= 1 and meta["frames"] == codes.shape[1]
            assert {k: meta[k] for k in clean[key] if k != "shard"} == {
                k: v for k, v in clean[key].items() if k != "shard"
            }
            assert meta["frame_rate"] == codec.frame_rate and meta["codec"] == "codec"
            assert (
                codes[0].max() < codec.config.semantic_codebook_size
                and codes[1:].max() < codec.config.codebook_size
            )
            seen += 1
    assert seen == len(clean)


def test_batched_codes_equal_one_utterance_at_a_time(tokenized, demo_clean, codec_file):
    codec = load_codec(codec_file)
    shard = sorted((demo_clean / "shards").glob("*.tar"))[0]
    tokens = read_tar(sorted((tokenized / "shards").glob("*.tar"))[0])
    for key, members in read_tar(shard).items():
        wav, rate = sf.read(io.BytesIO(members["flac"]), dtype="float32")
        alone = codec.encode(torch.from_numpy(wav), rate).numpy()
        np.testing.assert_array_equal(np.load(io.BytesIO(tokens[key]["codes.npy"])), alone)


def test_killed_tokenize_resumes_without_redoing_or_losing_shards(tokenized, demo_root, codec_file, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        "experiment=demo",
        "stage=tokenize",
        f"run_root={demo_root}",
        f"run_dir={run_dir}",
        f"tokenize.codec={codec_file}",
        "tokenize.batch_size=1",
        "tokenize.progress=false",
    ]
    finished = kill_after_units(overrides, run_dir, units=1, poll_s=0.01)
    units = run_dir / "units"
    total = len(list((tokenized / "units").glob("[0-9]*.json")))
    assert 1 <= len(finished) < total, "the kill came too late to test anything"
    run_cli(*overrides)
    assert all((units / n).stat().st_mtime_ns == t for n, t in finished.items())
    assert read_jsonl(run_dir / "manifest.jsonl") == read_jsonl(tokenized / "manifest.jsonl")
    for shard in (tokenized / "shards").glob("*.tar"):
        assert (run_dir / "shards" / shard.name).read_bytes() == shard.read_bytes()


def test_open_codec_explains_what_it_needs(tmp_path):
    with pytest.raises(ValueError, match="tokenize.codec is required"):
        open_codec(None)
    with pytest.raises(ValueError, match="neither codec.pt"):
        open_codec(str(tmp_path))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an s2train codec checkpoint"):
        open_codec(str(tmp_path / "other.pt"))


def test_the_codec_digest_reads_only_the_codecs_files(tmp_path, codec_file):
    """A released folder also holds the language model's weights (GBs): they are neither hashed nor read."""
    import shutil

    from data_pipeline.tokenize import codec_digest
    from s2train.checkpoints import codec_files

    folder = tmp_path / "release"
    folder.mkdir()
    shutil.copy(codec_file, folder / "codec.pt")
    before = codec_digest(str(folder))
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)  # a stand-in for the LM weights
    assert codec_files(folder) == [folder / "codec.pt"]
    assert codec_digest(str(folder)) == before == codec_digest(str(folder / "codec.pt"))
    (folder / "codec.pt").write_bytes((folder / "codec.pt").read_bytes() + b"\0")
    assert codec_digest(str(folder)) != before
