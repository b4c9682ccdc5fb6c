"""Seed-TTS-Eval SIM judge: a tiny random WavLM+ECAPA saved in the official ``{'model': state_dict}``
layout loads through the same path as the real wavlm_large_finetune.pth, with sizes read from shapes."""

from __future__ import annotations

import argparse
import logging

import numpy as np
import pytest
import torch
import torchaudio

from s2train.judges.sim_wavlm import (
    TINY_ARCH,
    WavLMEcapaSim,
    build_sim_model,
    load_audio_like_upstream,
    save_checkpoint,
)

RATE = 16000


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny model's state with every float entry randomised (running variances kept positive)."""
    torch.manual_seed(seed)
    state = build_sim_model(**TINY_ARCH).state_dict()
    for key, value in state.items():
        if value.is_floating_point():
            noise = torch.randn_like(value) * 0.3
            state[key] = noise.abs() + 0.5 if key.endswith("running_var") else value + noise
    return state


def clip(seed: int, seconds: float = 1.0) -> np.ndarray:
    """A band-limited (below 4 kHz) voiced-like clip: harmonics of a gliding pitch under an envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = rng.uniform(90, 220) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(1, 3) * t))
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    wav = sum(rng.uniform(0.2, 1) / k * np.sin(k * phase) for k in range(1, 4000 // 220))
    return (0.3 * wav * (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(2, 5) * t))).astype(np.float32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    state = random_state()
    path = tmp_path_factory.mktemp("sim") / "wavlm_large_finetune.pth"
    save_checkpoint(state, path)
    return state, path


@pytest.fixture(scope="module")
def judge(saved):
    return WavLMEcapaSim(saved[1])


def test_loaded_parameters_equal_the_saved_ones(saved, judge):
    state, _ = saved
    loaded = judge.model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert judge.arch.layers == TINY_ARCH["layers"] and judge.arch.heads == TINY_ARCH["heads"]
    assert judge.unexpected_keys == []


def test_similarity_of_the_same_voice_and_of_different_clips(judge):
    a, b = clip(1), clip(2)
    emb = judge.embed(a, RATE)
    assert emb.shape == (TINY_ARCH["emb_dim"],) and emb.dtype == torch.float32
    assert judge.similarity(a, RATE, a, RATE) == pytest.approx(1.0, abs=1e-5)
    a_24k = torchaudio.functional.resample(torch.from_numpy(a), RATE, 24000).numpy()
    resampled = judge.similarity(a, RATE, a_24k, 24000)
    different = judge.similarity(a, RATE, b, RATE)
    assert resampled > 0.9999
    # A random tiny model maps every clip near one direction, so compare distances from 1, not values.
    assert 1 - different > 100 * (1 - resampled) and different < 1 - 1e-4


def test_unexpected_entries_are_ignored_and_reported(saved, tmp_path, caplog):
    state, _ = saved
    extra = {
        **state,
        "projection.weight": torch.randn(4, 16),
        "feature_extract.model.mask_emb": torch.rand(32),
    }
    save_checkpoint(extra, tmp_path / "extra.pth")
    with caplog.at_level(logging.WARNING):
        judge = WavLMEcapaSim(tmp_path / "extra.pth")
    assert sorted(judge.unexpected_keys) == ["feature_extract.model.mask_emb", "projection.weight"]
    assert "projection.weight" in caplog.text
    assert torch.equal(judge.model.state_dict()["linear.weight"], state["linear.weight"])


def test_a_checkpoint_without_wavlm_weights_is_refused(saved, tmp_path):
    state, _ = saved
    save_checkpoint(
        {k: v for k, v in state.items() if not k.startswith("feature_extract.")}, tmp_path / "h.pth"
    )
    with pytest.raises(ValueError, match="no WavLM weights"):
        WavLMEcapaSim(tmp_path / "h.pth")
    partial = {k: v for k, v in state.items() if "encoder.layers.1.fc2" not in k}
    save_checkpoint(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="no WavLM weights"):
        WavLMEcapaSim(tmp_path / "partial.pth")


def test_missing_path_and_pickled_objects_are_refused(saved, tmp_path):
    with pytest.raises(ValueError, match="wavlm_large_finetune.pth"):
        WavLMEcapaSim(tmp_path / "absent.pth")
    torch.save({"model": saved[0], "args": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        WavLMEcapaSim(tmp_path / "pickled.pth")


def test_audio_loads_at_its_own_rate_with_the_first_channel(tmp_path):
    import soundfile as sf

    stereo = np.stack([clip(3, 0.2), clip(4, 0.2)], axis=1)
    sf.write(tmp_path / "stereo.wav", stereo, 24000, subtype="FLOAT")
    wav, sr = load_audio_like_upstream(tmp_path / "stereo.wav")
    assert sr == 24000 and wav.shape == (len(stereo),)
    np.testing.assert_array_equal(wav, stereo[:, 0])
