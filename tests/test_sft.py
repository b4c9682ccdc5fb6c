"""``stage=sft``: starts from a pretrain run or a released S2 Pro folder (as a trainable model), trains on
mixed examples with the shared trainer, resumes onto the uninterrupted loss curve, and writes a model
that synthesis opens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from s2train.checkpoints import open_dual_ar
from s2train.training.lm_module import read_losses
from tests.conftest import kill_when, run_cli
from tests.test_examples import write_rich_shards

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "fish_s2"
SFT = [
    "stage=sft",
    "text.n_semantic=64",
    "lm_data.max_len=512",
    "sft.train.batch_size=2",
    "sft.train.threads=1",
    "sft.train.progress=false",
    "sft.train.lr=3e-3",
    "sft.train.warmup_steps=2",
]


@pytest.fixture(scope="module")
def rich_tokens(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("rich_tokens")
    write_rich_shards(folder, n_shards=2, per_shard=16)
    return folder


@pytest.fixture(scope="module")
def pretrained(rich_tokens, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pretrain")
    run_cli(
        "stage=pretrain",
        f"lm_data.input={rich_tokens}",
        f"run_dir={run_dir}",
        "text.n_semantic=64",
        "lm_data.max_len=512",
        "train.max_steps=6",
        "train.warmup_steps=2",
        "train.batch_size=2",
        "train.threads=1",
        "train.progress=false",
        "train.lr=3e-3",
    )
    return run_dir


def _sft(tokens: Path, init: Path, run_dir: Path, *overrides: str) -> dict:
    run_cli(*SFT, f"lm_data.input={tokens}", f"sft.init={init}", f"run_dir={run_dir}", *overrides)
    return json.loads((run_dir / "results.json").read_text())


def test_sft_starts_from_the_pretrained_model_and_writes_what_pretraining_writes(
    rich_tokens, pretrained, tmp_path
):
    results = _sft(
        rich_tokens, pretrained, tmp_path / "sft", "sft.train.max_steps=8", "sft.train.checkpoint_every=4"
    )
    assert results["init"] == str(pretrained) and results["steps"] == 8
    rows = read_losses(tmp_path / "sft" / "losses.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert (tmp_path / "sft" / "loss_curve.png").stat().st_size > 10_000
    assert (tmp_path / "sft" / "checkpoints" / "last.ckpt").is_file()
    # it started from the pretrained weights: its first loss is well below a random model's (pretraining's
    # first), though its examples are harder (references, captions, dialogue)
    pretrain_rows = read_losses(pretrained / "losses.jsonl")
    assert results["first_loss"] < 0.9 * pretrain_rows[0]["loss/total"], (results, pretrain_rows[0])
    model, release = open_dual_ar(tmp_path / "sft")
    assert release is None and model.config == open_dual_ar(pretrained)[0].config
    trained, start = (
        load_file(tmp_path / "sft" / "model.safetensors"),
        load_file(pretrained / "model.safetensors"),
    )
    assert any(not torch.equal(trained[k], start[k]) for k in start)


def test_killed_sft_resumes_onto_the_uninterrupted_loss_curve(rich_tokens, pretrained, tmp_path):
    # with input noise on: a resumed run draws the noise an unbroken one draws
    steps = [
        "sft.train.max_steps=10",
        "sft.train.checkpoint_every=3",
        "sft.train.code_noise=0.3",
        "sft.train.semantic_noise=0.2",
    ]
    _sft(rich_tokens, pretrained, tmp_path / "whole", *steps)
    whole = read_losses(tmp_path / "whole" / "losses.jsonl")
    killed = tmp_path / "killed"
    args = [*SFT, f"lm_data.input={rich_tokens}", f"sft.init={pretrained}", f"run_dir={killed}", *steps]
    kill_when(args, (killed / "checkpoints" / "step-000006.ckpt").exists)
    assert len(read_losses(killed / "losses.jsonl")) < 10
    results = _sft(rich_tokens, pretrained, killed, *steps)
    assert results["resumed_from_step"] in (3, 6)
    assert read_losses(killed / "losses.jsonl") == whole


def test_a_released_s2_pro_folder_trains_as_a_model(tmp_path):
    tokens = tmp_path / "tokens"
    write_rich_shards(tokens, n_shards=1, per_shard=12, sizes=(64,) * 10)  # the fixture: 10 x 64 codes
    release = FIXTURES / "tiny_s2pro"
    results = _sft(tokens, release, tmp_path / "sft", "sft.train.max_steps=6", "text.n_speakers=2")
    rows = read_losses(tmp_path / "sft" / "losses.jsonl")
    assert len(rows) == 6 and all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows)
    assert results["final_loss"] < results["first_loss"]
    model, _ = open_dual_ar(tmp_path / "sft")
    released, _ = open_dual_ar(release)
    assert model.config.num_codebooks == 10 and model.config.vocab_size == released.config.vocab_size
    ours = model.state_dict()
    assert any(not torch.equal(ours[k], v) for k, v in released.state_dict().items())


def test_sft_refuses_a_model_that_does_not_fit_the_data(tmp_path, pretrained):
    tokens = tmp_path / "tokens"
    write_rich_shards(tokens, n_shards=1, sizes=(64,) * 10)
    result = run_cli(
        *SFT, f"lm_data.input={tokens}", f"sft.init={pretrained}", f"run_dir={tmp_path / 'x'}", check=False
    )
    assert result.returncode != 0 and "does not fit this token data" in result.stderr
