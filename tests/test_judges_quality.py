"""Quality judge: DNSMOS with sessions made once, SNR, clipping, bandwidth and the keep rule."""

from __future__ import annotations

import json

import numpy as np
import pytest

from s2train.audio import resample
from s2train.judges.quality import (
    QualityConfig,
    QualityJudge,
    bandwidth_hz,
    clipping_ratio,
    dnsmos_model,
    load_calibrated_threshold,
    snr_db,
)

SENTENCE = "The small boat moved slowly across the quiet lake, and the children waved from the shore."


def test_dnsmos_sessions_are_made_once_per_process():
    assert dnsmos_model(1) is dnsmos_model(1)
    judge_a, judge_b = (
        QualityJudge(QualityConfig(onnx_threads=1)),
        QualityJudge(QualityConfig(onnx_threads=1)),
    )
    assert judge_a.dnsmos is judge_b.dnsmos


def test_dnsmos_prefers_clean_speech_to_noisy(flite_wav):
    clean = flite_wav("rms", SENTENCE)
    rng = np.random.default_rng(0)
    noisy = clean + rng.standard_normal(len(clean)).astype(np.float32) * 0.05
    model = dnsmos_model(0)
    s_clean, s_noisy = model(clean, 9.01), model(noisy, 9.01)
    assert set(s_clean) == {"ovrl", "sig", "bak", "p808"}
    assert s_clean["ovrl"] > s_noisy["ovrl"] + 0.5 and s_clean["bak"] > s_noisy["bak"]
    assert 1.0 <= s_noisy["ovrl"] < s_clean["ovrl"] <= 5.0


def test_snr_falls_as_noise_rises(flite_wav):
    clean = flite_wav("awb", SENTENCE)
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(len(clean)).astype(np.float32)
    values = [snr_db(clean + level * noise) for level in (1e-4, 3e-3, 3e-2, 1e-1)]
    assert values == sorted(values, reverse=True) and values[0] > 30 and values[-1] < 15


def test_clipping_ratio_sees_hard_clipping_even_after_scaling(flite_wav):
    clean = flite_wav("slt", SENTENCE)
    clipped = np.clip(clean * 8, -1, 1)
    assert clipping_ratio(clean) < 1e-4
    assert clipping_ratio(clipped) > 0.01
    assert clipping_ratio(0.5 * clipped) == pytest.approx(clipping_ratio(clipped))
    assert clipping_ratio(np.zeros(100, np.float32)) == 0.0


def test_bandwidth_tells_telephone_audio_from_wideband(flite_wav):
    wide = resample(flite_wav("rms", SENTENCE), 16000, 44100)
    narrow = resample(resample(flite_wav("rms", SENTENCE), 16000, 8000), 8000, 44100)
    assert bandwidth_hz(wide, 44100) > 6000
    assert 2500 < bandwidth_hz(narrow, 44100) <= 4100


def test_keep_rule_names_the_first_failing_check(tmp_path):
    judge = QualityJudge(QualityConfig(dnsmos_ovrl_min=3.0))
    good = {"clipping": 0.0, "snr_db": 40.0, "bandwidth_hz": 8000.0, "dnsmos": {"ovrl": 3.4}}
    assert judge.verdict(good) is None
    assert judge.verdict({**good, "dnsmos": {"ovrl": 2.5}}) == "low_dnsmos"
    assert judge.verdict({**good, "bandwidth_hz": 3000.0, "dnsmos": {"ovrl": 2.5}}) == "low_bandwidth"
    assert judge.verdict({**good, "snr_db": 5.0, "bandwidth_hz": 3000.0}) == "low_snr"
    assert judge.verdict({**good, "clipping": 0.2, "snr_db": 5.0}) == "clipping"


def test_calibration_file_sets_the_dnsmos_threshold(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"dnsmos_ovrl_min": 2.41}))
    assert load_calibrated_threshold(QualityConfig(calibration=str(path))) == 2.41
    assert load_calibrated_threshold(QualityConfig()) == 3.0
    with pytest.raises(ValueError, match="does not exist"):
        load_calibrated_threshold(QualityConfig(calibration=str(tmp_path / "missing.json")))
