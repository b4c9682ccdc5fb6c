"""``experiment=demo`` ends by speaking its sentences with the model and codec it trained
(``demo_root`` runs the demo once per session, with short trainings and 40-frame sentences)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from omegaconf import OmegaConf

from s2train.__main__ import CONF_DIR
from tests.conftest import read_jsonl


def test_the_demo_synthesises_wav_files_from_its_own_model_and_codec(demo_root):
    run = demo_root / "demo" / "synthesize"
    results = json.loads((run / "results.json").read_text())
    sentences = OmegaConf.load(f"{CONF_DIR}/experiment/demo.yaml").synthesize.texts
    assert results["utterances"] == results["synthesized"] == len(sentences) == 3
    assert results["model"] == str(demo_root / "demo" / "pretrain") and results["codec"] == "codec"
    manifest = read_jsonl(run / "manifest.jsonl")
    assert [m["text"] for m in manifest] == list(sentences)
    for row in manifest:
        audio, rate = sf.read(run / row["wav"], dtype="float32")
        assert rate == 16000 and (row["frames"] == 40 or row["ended_on_im_end"])
        assert len(audio) == row["frames"] * 320  # the demo codec's 50 Hz frames
        assert np.isfinite(audio).all() and (len(audio) == 0 or np.abs(audio).max() > 0)
    assert results["frames"] == sum(m["frames"] for m in manifest)
    assert results["audio_s"] == pytest.approx(results["frames"] * 320 / 16000, abs=1e-3)
