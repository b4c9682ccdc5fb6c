"""The demo codec's acceptance figure, with the demo's full training (about 15 CPU minutes, so ``slow``):
on the held-out English utterances, pocketsphinx's word error rate on the reconstructions is at most
15 points above its error rate on the originals.

    python -m pytest -m slow tests/test_demo_codec_quality.py
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli


@pytest.mark.slow
def test_demo_codec_keeps_heldout_speech_intelligible(demo_root, tmp_path):
    run_dir = tmp_path / "codec"
    run_cli("experiment=demo", "stage=codec", f"run_root={demo_root}", f"run_dir={run_dir}", timeout=3600)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["wer_utterances"] >= 3
    assert results["wer_delta"] <= 15, results
    assert results["heldout_mel_distance"] < 0.2, results  # 0.154 measured
