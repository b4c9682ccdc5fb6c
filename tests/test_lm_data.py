"""Pretraining data on tiny token shards written in the real format: shards are split over ranks and
workers without loss or repeat, a resumed stream continues exactly where it stopped, packing keeps
``max_len`` and one speaker per sequence, and the model is fed exactly the ids the prompt builder makes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from s2train.shards import write_tar
from s2train.text.prompt import build_prompt, inputs_and_labels
from s2train.text.tokenizer import ByteTokenizer
from s2train.training.lm_data import Collate, LMDataConfig, TokenStream, open_token_source

K = 4  # codebooks
TOK = ByteTokenizer(n_speakers=4, n_semantic=64)
PAD = TOK.token_id("<|pad|>")
IM_END = TOK.token_id("<|im_end|>")
WORDS = "rain fell softly on the quiet harbour town before seven ships sailed north".split()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_token_shards(
    folder: Path, n_shards: int, per_shard: int = 12, seed: int = 0, long_key=None
) -> dict:
    """``n_shards`` token tars of ``per_shard`` utterances (2-3 speakers each); returns key -> meta+codes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = {}
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            key = f"s{s}u{i}"
            frames = 400 if key == long_key else int(rng.integers(2, 30))
            codes = np.concatenate([rng.integers(0, 64, (1, frames)), rng.integers(0, 32, (K - 1, frames))])
            codes = codes.astype(np.uint16)
            text = " ".join(rng.choice(WORDS, int(rng.integers(1, 6)))).capitalize() + "."
            meta = {
                "id": key,
                "text": text,
                "speaker": f"spk{s}-{i // 2 % 3}",
                "lang": "en",
                "caption": "",
                "codec": "tiny",
                "frame_rate": 21.5,
                "frames": frames,
                "codebooks": K,
            }
            members += [(f"{key}.codes.npy", _npy(codes)), (f"{key}.json", json.dumps(meta).encode())]
            corpus[key] = {**meta, "codes": codes}
        write_tar(folder / "shards" / f"tokens-{s:06d}.tar", members)
    return corpus


def make_stream(folder: Path, rank: int = 0, world_size: int = 1, **cfg) -> TokenStream:
    cfg = LMDataConfig(**{"max_len": 300, "loop": False, **cfg})
    return TokenStream(open_token_source(folder), TOK, K, cfg, seed=7, rank=rank, world_size=world_size)


def loader(stream: TokenStream, workers: int = 2, batch_size: int = 2) -> DataLoader:
    return DataLoader(stream, batch_size=batch_size, num_workers=workers, collate_fn=Collate(PAD))


def batch_keys(batches) -> list[str]:
    return [k for b in batches for keys in b["keys"] for k in keys]


def assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a["keys"] == b["keys"]
        for name in ("inputs", "labels", "positions", "segment_ids", "stream"):
            assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def corpus3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokens3")
    return folder, write_token_shards(folder, n_shards=3)


# ------------------------------------------------------------------------------------------ splitting


@pytest.mark.parametrize("n_shards", [3, 5])
def test_two_ranks_of_two_workers_see_every_utterance_exactly_once(tmp_path, n_shards):
    """3 shards < 4 readers: split by utterance; 5 shards: split by shard. No reader is left empty."""
    corpus = write_token_shards(tmp_path, n_shards)
    seen = []
    for rank in range(2):
        batches = list(loader(make_stream(tmp_path, rank=rank, world_size=2)))
        assert {int(r) for b in batches for r in b["stream"][:, 0]} == {0, 1}, "a reader got nothing"
        seen += batch_keys(batches)
    assert sorted(seen) == sorted(corpus)


def test_epochs_are_reshuffled_and_reproducible(corpus3):
    folder, corpus = corpus3
    stream = make_stream(folder)
    first = batch_keys(loader(stream, workers=0))
    assert batch_keys(loader(make_stream(folder), workers=0)) == first
    stream.set_epoch(1)
    second = batch_keys(loader(stream, workers=0))
    assert sorted(first) == sorted(second) == sorted(corpus) and first != second


# ------------------------------------------------------------------------------------------- resuming


@pytest.mark.parametrize("loop", [False, True])
def test_a_resumed_stream_yields_exactly_the_remaining_batches(corpus3, loop):
    """Stopped after 3 batches and again after 6 (each time through a JSON round trip of the state),
    it yields what one uninterrupted run yields, batch for batch: through the end of an epoch where one
    worker runs out before the other, or across epochs when it loops."""
    folder, _ = corpus3
    full = []
    for batch in loader(make_stream(folder, loop=loop)):
        full.append(batch)
        if len(full) == 25:
            break
    epochs = {int(e) for b in full for e in b["stream"][:, 2]}
    assert len(full) > 6 and (len(epochs) > 1 if loop else epochs == {0})
    got, state = [], None
    for stop in (3, 6, len(full)):
        stream = make_stream(folder, loop=loop)
        if state is not None:
            stream.load_state_dict(json.loads(json.dumps(state)))
        for batch in loader(stream):
            stream.advance(batch["stream"])  # what training_step does
            got.append(batch)
            if len(got) == stop:
                break
        state = stream.state_dict()
    assert_same_batches(got, full)


def test_resuming_with_other_workers_is_refused(corpus3):
    folder, _ = corpus3
    stream = make_stream(folder)
    stream.advance(next(iter(loader(stream)))["stream"])
    with pytest.raises(ValueError, match="same number"):
        next(iter(loader(stream, workers=0)))


# -------------------------------------------------------------------------------------------- packing


def test_the_model_is_fed_the_prompt_builders_ids(corpus3):
    folder, corpus = corpus3
    checked = 0
    for batch in loader(make_stream(folder), workers=0):
        for b, keys in enumerate(batch["keys"]):
            for segment, key in enumerate(keys):
                at = batch["segment_ids"][b] == segment
                utterance = corpus[key]
                codes = torch.from_numpy(utterance["codes"].astype(np.int64))
                train = build_prompt(TOK, utterance["text"], K, codes=codes)
                inputs, labels = inputs_and_labels(train, TOK)
                assert torch.equal(batch["inputs"][b][:, at], inputs)
                assert torch.equal(batch["labels"][b][:, at], labels)
                generate = build_prompt(TOK, utterance["text"], K).tokens  # what inference starts from
                assert torch.equal(batch["inputs"][b][:, at][:, : generate.shape[1]], generate)
                checked += 1
    assert checked == len(corpus)


def test_packing_keeps_max_len_one_speaker_and_isolated_segments(corpus3):
    folder, corpus = corpus3
    max_len = 300
    packed = 0
    for batch in loader(make_stream(folder, max_len=max_len), workers=0, batch_size=3):
        assert batch["inputs"].shape[2] <= max_len
        for b, keys in enumerate(batch["keys"]):
            assert len({corpus[k]["speaker"] for k in keys}) == 1
            packed += len(keys) > 1
            segment_ids, positions = batch["segment_ids"][b], batch["positions"][b]
            real = int((segment_ids < len(keys)).sum())
            assert torch.equal(segment_ids[:real], segment_ids[:real].sort().values)
            assert segment_ids[:real].unique().tolist() == list(range(len(keys)))
            for segment in range(len(keys) + 1):
                at = segment_ids == segment
                assert torch.equal(positions[at], torch.arange(int(at.sum())))
                if segment < len(keys):  # the last label of an utterance is its own <|im_end|>
                    assert batch["labels"][b][0, at][-1] == IM_END
            pad = segment_ids == len(keys)
            assert (batch["inputs"][b][0, pad] == PAD).all() and not batch["inputs"][b][1:, pad].any()
            assert (batch["labels"][b][:, pad] == -100).all()
    assert packed, "nothing was packed"


@pytest.mark.parametrize("overlong", ["drop", "cut"])
def test_overlong_utterances_are_dropped_or_cut_and_counted(tmp_path, overlong):
    corpus = write_token_shards(tmp_path, n_shards=1, long_key="s0u3")
    stream = make_stream(tmp_path, overlong=overlong)
    lengths = {}
    for batch in loader(stream, workers=0, batch_size=1):
        stream.advance(batch["stream"])
        for segment, key in enumerate(batch["keys"][0]):
            lengths[key] = int((batch["segment_ids"][0] == segment).sum())
    assert stream.overlong_count == 1
    if overlong == "drop":
        assert sorted(lengths) == sorted(k for k in corpus if k != "s0u3")
    else:
        assert sorted(lengths) == sorted(corpus) and lengths["s0u3"] == 300


def test_collate_pads_to_a_fixed_length(corpus3):
    folder, _ = corpus3
    batch = next(iter(DataLoader(make_stream(folder), batch_size=2, collate_fn=Collate(PAD, pad_to=320))))
    assert batch["inputs"].shape == batch["labels"].shape == (2, 1 + K, 320)
    assert batch["positions"].shape == batch["segment_ids"].shape == (2, 320)
    assert batch["inputs"].dtype == batch["labels"].dtype == batch["positions"].dtype == torch.int64
    with pytest.raises(ValueError, match="does not fit"):
        next(iter(DataLoader(make_stream(folder), batch_size=2, collate_fn=Collate(PAD, pad_to=8))))


# -------------------------------------------------------------------------------------------- sources


def test_a_saved_hf_dataset_streams_like_the_tars(tmp_path):
    from datasets import Dataset

    corpus = write_token_shards(tmp_path / "tars", n_shards=1)
    rows = [corpus[k] for k in sorted(corpus, key=lambda k: int(k[3:]))]
    Dataset.from_dict(
        {
            "id": [r["id"] for r in rows],
            "text": [r["text"] for r in rows],
            "speaker": [r["speaker"] for r in rows],
            "codes": [r["codes"].tolist() for r in rows],
        }
    ).save_to_disk(str(tmp_path / "hf"))
    assert_same_batches(
        list(loader(make_stream(tmp_path / "hf"), workers=0)),
        list(loader(make_stream(tmp_path / "tars"), workers=0)),
    )


def test_open_token_source_says_what_it_needs(tmp_path):
    with pytest.raises(ValueError, match="no token data"):
        open_token_source(tmp_path)
    with pytest.raises(ValueError, match="max_len"):
        LMDataConfig(max_len=2)
