"""``stage=codec`` on a tiny synthetic clean run: the loss falls, a rerun resumes from ``last.ckpt`` and
writes a ``codec.pt`` that ``load_codec`` reads, previews appear, and the adversarial path runs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from data_pipeline.demo_corpus import synthesize
from s2train.audio import flac_bytes
from s2train.checkpoints import load_codec
from s2train.cli import run_stage
from s2train.config import S2Config
from s2train.shards import write_tar
from s2train.training.codec_data import CropStream, index_shards, read_audio, read_crop, split_heldout
from s2train.training.codec_module import CodecTrainConfig, lr_factor

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A codec turns speech into a few numbers per frame.",
    "Rain fell softly on the quiet harbour town.",
    "Seven ships sailed north before the winter storms.",
    "She counted the stars until the morning came.",
]


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory) -> Path:
    """A clean run directory with two shards of flite speech at 16 kHz."""
    root = tmp_path_factory.mktemp("clean")
    members = []
    for i, text in enumerate(SENTENCES):
        wav = synthesize("awb", text, 16000)
        meta = {"id": f"utt{i:03d}", "duration": len(wav) / 16000, "sample_rate": 16000, "text": text}
        members.append(
            [(f"utt{i:03d}.flac", flac_bytes(wav, 16000)), (f"utt{i:03d}.json", json.dumps(meta).encode())]
        )
    write_tar(root / "shards" / "clean-000000.tar", [m for pair in members[:3] for m in pair])
    write_tar(root / "shards" / "clean-000001.tar", [m for pair in members[3:] for m in pair])
    return root


def _config(run_dir: Path, clean: Path, **train) -> S2Config:
    settings = dict(
        input=str(clean),
        segment_s=0.64,
        batch_size=4,
        lr=1e-3,
        warmup_steps=4,
        log_every=1,
        threads=1,
        heldout_items=1,
    )
    codec_train = CodecTrainConfig(**(settings | train))
    return OmegaConf.to_object(
        OmegaConf.structured(S2Config(stage="codec", run_dir=str(run_dir), codec_train=codec_train))
    )


def _metrics(run_dir: Path) -> list[list[dict]]:
    """The rows of every run's ``metrics.csv``, one list per run, oldest first."""
    files = sorted((run_dir / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    return [list(csv.DictReader(f.open())) for f in files]


def test_crops_are_deterministic_and_heldout_is_never_trained(clean_dir):
    items = index_shards(clean_dir / "shards")
    train, heldout = split_heldout(items, 1)
    assert len(items) == 5 and len(heldout) == 1 and heldout[0] not in train
    first = [x for _, x in zip(range(6), CropStream(train, 16000, 4000, seed=3))]
    again = [x for _, x in zip(range(6), CropStream(train, 16000, 4000, seed=3))]
    assert all(a.shape == (1, 4000) and (a == b).all() for a, b in zip(first, again))
    other = next(iter(CropStream(train, 16000, 4000, seed=3, stream=10)))
    assert not (other == first[0]).all()


def test_a_crop_is_a_stretch_of_the_utterance_at_the_codec_rate(clean_dir, tmp_path):
    (item, *_), rng = index_shards(clean_dir / "shards"), np.random.default_rng(0)
    whole = read_audio(item, 16000)
    for _ in range(3):  # only the stretch is decoded, and it is where the whole utterance has it
        crop = read_crop(item, 16000, 4000, rng)
        windows = np.lib.stride_tricks.sliding_window_view(whole, 4000)
        assert crop.shape == (4000,) and np.abs(windows - crop).max(axis=1).min() < 1e-6
    longer = read_crop(item, 16000, len(whole) + 500, rng)  # zero-padded past the utterance's end
    assert np.array_equal(longer[: len(whole)], whole) and not longer[len(whole) :].any()
    # a shard at another rate: the crop is resampled to exactly the codec's samples
    wav = synthesize("awb", SENTENCES[0], 22050)
    write_tar(tmp_path / "shards" / "clean-000000.tar", [("u.flac", flac_bytes(wav, 22050))])
    (other,) = index_shards(tmp_path / "shards")
    crop = read_crop(other, 16000, 4000, rng)
    assert crop.shape == (4000,) and crop.dtype == np.float32 and np.abs(crop).max() > 0.01


def test_the_learning_rate_warms_up_decays_and_cools_down_to_zero():
    plain = CodecTrainConfig(max_steps=1000, warmup_steps=100, lr_decay=0.999)
    assert lr_factor(plain, 0) == pytest.approx(0.01) and lr_factor(plain, 99) == pytest.approx(0.999**99)
    assert lr_factor(plain, 999) == pytest.approx(0.999**999)  # no cool-down: DAC's decay alone
    cool = CodecTrainConfig(max_steps=1000, warmup_steps=100, lr_decay=1.0, lr_cooldown=0.2)
    assert [lr_factor(cool, s) for s in (500, 800, 900, 1000)] == pytest.approx([1.0, 1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="lr_cooldown"):
        CodecTrainConfig(lr_cooldown=1.5)


def test_metrics_are_logged_every_log_every_updates(clean_dir, tmp_path):
    run_dir = tmp_path / "sparse"
    results = run_stage(
        _config(
            run_dir, clean_dir, max_steps=6, log_every=3, warmup_steps=2, dead_code_every=2, preview_every=0
        )
    )
    (rows,) = _metrics(run_dir)
    assert [int(r["step"]) for r in rows if r.get("mel/loss")] == [2, 5]  # Lightning counts from 0
    # a restart's count is written on its own step only, not repeated on later rows
    assert [int(r["step"]) for r in rows if r.get("vq/restarted")] == [3, 5]
    assert math.isfinite(results["final_losses"]["mel/loss"]) and len(results["codebook_perplexity"]) == 4


def test_training_lowers_the_loss_resumes_and_writes_a_codec(clean_dir, tmp_path):
    run_dir = tmp_path / "codec"
    first = run_stage(_config(run_dir, clean_dir, max_steps=12, checkpoint_every=6, preview_every=12))
    assert first["steps"] == 12 and first["resumed_from_step"] == 0
    (rows,) = _metrics(run_dir)
    mel = [float(r["mel/loss"]) for r in rows if r.get("mel/loss")]
    assert len(mel) == 12 and np.mean(mel[-3:]) < np.mean(mel[:3])
    # the quantizer is bypassed during the 4 warm-up steps, then starts from the encoder's outputs
    commitment = [float(r["vq/commitment"]) for r in rows if r.get("vq/commitment")]
    assert commitment[:4] == [0.0] * 4 and min(commitment[4:]) > 0
    weights = set(CodecTrainConfig().loss_weights) - {"adv/gen", "adv/feat"}
    assert weights <= set(rows[0])  # loss weights are keyed by the logged names
    assert {f"vq/perplexity_{k}" for k in range(4)} | {f"vq/dead_{k}" for k in range(4)} <= set(rows[0])
    preview = run_dir / "previews" / "step-000012"
    assert list(preview.glob("*.wav")) and (preview / "mel.png").stat().st_size > 0
    assert (run_dir / "checkpoints" / "last.ckpt").exists()

    second = run_stage(_config(run_dir, clean_dir, max_steps=24, checkpoint_every=6, preview_every=0))
    assert second["resumed_from_step"] == 12 and second["steps"] == 24
    _, resumed = _metrics(run_dir)
    steps = [int(r["step"]) for r in resumed if r.get("mel/loss")]
    assert min(steps) >= 12 and len(steps) == 12  # the global step went on from the checkpoint
    codec = load_codec(run_dir / "codec.pt")
    assert codec.config.sample_rate == 16000 and math.isfinite(second["heldout_mel_distance"])
    assert len(second["heldout_codebook_usage"]) == codec.config.n_codebooks


def test_adversarial_training_gives_finite_losses(clean_dir, tmp_path):
    run_dir = tmp_path / "adv"
    cfg = _config(
        run_dir, clean_dir, max_steps=2, adversarial=True, disc_width=4, batch_size=2, preview_every=0
    )
    results = run_stage(cfg)
    assert results["steps"] == 2
    losses = results["final_losses"]
    assert all(math.isfinite(losses[k]) for k in ("adv/gen", "adv/feat", "adv/disc", "mel/loss"))
    (rows,) = _metrics(run_dir)
    assert set(CodecTrainConfig().loss_weights) | {"adv/disc"} <= set(rows[0])
    assert load_codec(run_dir / "codec.pt").config.n_codebooks == 4


def test_heldout_wer_scores_given_transcripts_not_the_judges_own():
    """Against a transcript the ASR judge wrote, its WER on the original is 0 by construction: the codec's
    held-out WER scores the utterances that came with a transcript, and the ASR-written ones only when
    no held-out utterance has one. Shards from before ``text_source`` are told by text == asr_text."""
    from s2train.training.codec_stage import transcript_source, wer_items

    given = {"lang": "en", "text": "Hello there.", "asr_text": "hello bear", "text_source": "given"}
    heard = {"lang": "en", "text": "hello bear", "asr_text": "hello bear", "text_source": "asr"}
    older = {"lang": "en", "text": "hello bear", "asr_text": "hello bear"}  # no text_source field
    older_given = {"lang": "en", "text": "Hello there.", "asr_text": "hello bear"}
    chinese = {"lang": "zh", "text": "你好", "asr_text": "", "text_source": "given"}
    silent = {"lang": "en", "text": "", "asr_text": "", "text_source": "asr"}
    sources = [transcript_source(m) for m in (given, heard, older, older_given)]
    assert sources == ["given", "asr", "asr", "given"]
    metas = [heard, given, chinese, older, older_given, silent]
    assert wer_items(metas, ["en"]) == ([1, 4], "given")
    assert wer_items(metas, None) == ([1, 2, 4], "given")  # a judge of every language
    assert wer_items([heard, chinese, older, silent], ["en"]) == ([0, 2], "asr")
    assert wer_items([chinese, silent], ["en"]) == ([], "asr")
