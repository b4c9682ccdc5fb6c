"""SIM parity with upstream: a tiny random WavLM + ECAPA-TDNN built by Seed-TTS-Eval's own UniSpeech
code (and the s3prl WavLM its torch.hub call returns), saved in the official ``{'model': state_dict}``
layout, must give through our judge the similarities that upstream ``verification.py`` gave, clips at
16 and 24 kHz included (torchaudio resampling). References: tests/fixtures/sim_parity/ (README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from s2train.judges.sim_wavlm import WavLMEcapaSim, load_audio_like_upstream

FIXTURE = Path(__file__).parent / "fixtures" / "sim_parity"
REFS = json.loads((FIXTURE / "references.json").read_text())
TOL = 1e-4


@pytest.fixture(scope="module")
def judge():
    return WavLMEcapaSim(FIXTURE / REFS["checkpoint"]["file"])


@pytest.fixture(scope="module")
def clips():
    return {name: load_audio_like_upstream(FIXTURE / c["file"]) for name, c in REFS["clips"].items()}


def test_fixture_covers_both_rates_and_mixed_pairs():
    rates = {c["rate"] for c in REFS["clips"].values()}
    assert rates == {16000, 24000}
    mixed = [p for p in REFS["pairs"] if REFS["clips"][p["a"]]["rate"] != REFS["clips"][p["b"]]["rate"]]
    assert len(mixed) >= 3


def test_loads_upstream_checkpoint_with_upstream_sizes(judge):
    cfg, ecapa = REFS["wavlm_cfg"], REFS["ecapa"]
    arch = judge.arch
    assert arch.dim == cfg["encoder_embed_dim"] and arch.layers == cfg["encoder_layers"]
    assert arch.heads == cfg["encoder_attention_heads"] and arch.num_buckets == cfg["num_buckets"]
    assert (arch.conv_pos, arch.conv_pos_groups) == (cfg["conv_pos"], cfg["conv_pos_groups"])
    assert (arch.channels, arch.cat_channels, arch.emb_dim) == (
        ecapa["channels"],
        ecapa["cat_channels"],
        ecapa["emb_dim"],
    )


def test_clips_load_at_their_own_rate(clips):
    for name, (wav, sr) in clips.items():
        assert sr == REFS["clips"][name]["rate"] and len(wav) == REFS["clips"][name]["samples"]


@pytest.mark.parametrize("pair", REFS["pairs"], ids=lambda p: f"{p['a']}-{p['b']}")
def test_similarity_equals_upstream(judge, clips, pair):
    ours = judge.similarity(*clips[pair["a"]], *clips[pair["b"]])
    assert abs(ours - pair["sim"]) <= TOL, (ours, pair["sim"])


@pytest.mark.parametrize("name", sorted(REFS["embeddings"]))
def test_embedding_equals_upstream(judge, clips, name):
    """Diagnostic: the per-clip embedding along the same path (localises a similarity mismatch)."""
    ours = judge.embed(*clips[name])
    ref = torch.tensor(REFS["embeddings"][name])
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
