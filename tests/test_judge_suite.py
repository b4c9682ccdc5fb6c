"""The judge suite: judges are built on first use only, a missing local model is refused by name before
anything loads, cleaning and evaluation take their judges from it, and ``s2train.judges`` imports none
of the stages."""

from __future__ import annotations

import ast
import shutil
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from s2train.judges import JUDGE_RATE
from s2train.judges.asr import ASRConfig, ParaformerASR, PocketSphinxASR, WhisperConfig
from s2train.judges.quality import QualityConfig
from s2train.judges.speaker import (
    ResemblyzerEmbedder,
    SpeakerConfig,
    SpeakerJudge,
    WavLMEcapaEmbedder,
)
from s2train.judges.suite import JUDGES, JudgesConfig, JudgeSuite

JUDGES_DIR = Path(__file__).resolve().parent.parent / "s2train" / "judges"


def built(suite: JudgeSuite) -> set[str]:
    """The judges the suite has built so far (``cached_property`` keeps them in the instance dict)."""
    return set(JUDGES) & set(vars(suite))


def test_the_suite_builds_nothing_until_a_judge_is_used(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the VAD was built though only the ASR was used")

    monkeypatch.setattr("s2train.judges.suite.SileroVAD", refuse)
    suite = JudgeSuite(JudgesConfig())
    assert built(suite) == set()
    assert isinstance(suite.asr, PocketSphinxASR)
    assert suite.asr is suite.asr  # built once
    assert built(suite) == {"asr"}


def test_the_speaker_check_shares_the_embedder():
    suite = JudgeSuite(JudgesConfig())
    assert isinstance(suite.speaker, SpeakerJudge)
    assert suite.speaker.embedder is suite.embedder
    assert isinstance(suite.embedder, ResemblyzerEmbedder)
    assert built(suite) == {"speaker", "embedder"}


@pytest.mark.parametrize(
    ("make", "name", "message"),
    [
        (
            lambda p: JudgesConfig(asr=ASRConfig(backend="whisper", whisper=WhisperConfig(checkpoint=p))),
            "asr",
            "local openai-whisper checkpoint",
        ),
        (lambda p: JudgesConfig(asr=ASRConfig(backend="paraformer", paraformer=p)), "asr", "paraformer-zh"),
        (
            lambda p: JudgesConfig(speaker=SpeakerConfig(backend="speechbrain", checkpoint=p)),
            "speaker",
            "hyperparams.yaml",
        ),
        (
            lambda p: JudgesConfig(speaker=SpeakerConfig(backend="wavlm_ecapa", checkpoint=p)),
            "embedder",
            "wavlm_large_finetune.pth",
        ),
        (lambda p: JudgesConfig(quality=QualityConfig(calibration=p)), "quality", "does not exist"),
    ],
)
def test_a_missing_local_model_is_refused_by_name_before_anything_loads(tmp_path, make, name, message):
    missing = str(tmp_path / "absent")
    suite = JudgeSuite(make(missing))
    for check in (suite.check_paths, lambda: suite.check_paths(name)):
        with pytest.raises(ValueError, match=message) as error:
            check()
        assert missing in str(error.value)
    assert built(suite) == set()
    others = [j for j in JUDGES if j != name and not {j, name} <= {"speaker", "embedder"}]
    suite.check_paths(*others)  # the other judges' paths are not this one's business
    with pytest.raises(ValueError, match=message):
        getattr(suite, name)  # building it says the same


def test_check_paths_names_the_judges_it_knows():
    with pytest.raises(ValueError, match="unknown judge 'sim'"):
        JudgeSuite(JudgesConfig()).check_paths("sim")


def test_wavlm_ecapa_is_a_speaker_embedder(tmp_path):
    from s2train.judges.sim_wavlm import TINY_ARCH, build_sim_model, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path / "wavlm_large_finetune.pth"
    save_checkpoint(build_sim_model(**TINY_ARCH).state_dict(), path)
    suite = JudgeSuite(JudgesConfig(speaker=SpeakerConfig(backend="wavlm_ecapa", checkpoint=str(path))))
    suite.check_paths()
    rng = np.random.default_rng(0)
    windows = [rng.standard_normal(JUDGE_RATE).astype(np.float32) * 0.1 for _ in range(3)]
    emb = suite.embedder.embed(windows)
    assert isinstance(suite.embedder, WavLMEcapaEmbedder) and emb.shape == (3, TINY_ARCH["emb_dim"])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    expected = suite.embedder.model.similarity(windows[0], JUDGE_RATE, windows[1], JUDGE_RATE)
    assert float(emb[0] @ emb[1]) == pytest.approx(expected, abs=1e-5)
    [scores] = suite.speaker([np.concatenate(windows)])
    assert scores["windows"] >= 3 and -1.0 <= scores["min_similarity"] <= 1.0


def test_paraformer_backend_through_funasr(tmp_path, monkeypatch):
    """funasr (the zh extra) stands in: the backend hands it the samples, or the file paths as
    Seed-TTS-Eval does, and asks for no VAD or punctuation model."""
    calls = []

    class AutoModel:
        def __init__(self, **kwargs):
            calls.append(kwargs)

        def generate(self, input, batch_size_s):
            calls.append(input)
            return [{"text": "你好世界"}]

    monkeypatch.setitem(sys.modules, "funasr", types.SimpleNamespace(AutoModel=AutoModel))
    suite = JudgeSuite(JudgesConfig(asr=ASRConfig(backend="paraformer", paraformer=str(tmp_path))))
    suite.check_paths("asr")
    assert isinstance(suite.asr, ParaformerASR) and calls[0]["model"] == str(tmp_path)
    assert set(calls[0]) == {"model", "device", "disable_update", "disable_pbar"}
    wav = np.zeros(JUDGE_RATE, np.float32)
    zh, en = suite.asr([wav, wav], ["zh", "en"])
    assert (zh.text, zh.lang, zh.supported) == ("你好世界", "zh", True)
    assert not en.supported and isinstance(calls[1], np.ndarray)
    assert suite.asr.transcribe_files([tmp_path / "a.wav"]) == ["你好世界"]
    assert calls[-1] == str(tmp_path / "a.wav")


# ----------------------------------------------------------------------------------- the stages' use


def test_clean_takes_its_judges_from_the_suite(tmp_path, monkeypatch):
    from data_pipeline import clean
    from data_pipeline.sources import DataConfig
    from s2train.config import S2Config

    raw = tmp_path / "raw"
    raw.mkdir()
    sf.write(raw / "a.wav", np.zeros(JUDGE_RATE, np.float32), JUDGE_RATE)
    seen = []

    def process_item(item, cfg, judges, out):
        seen.append(judges)
        return 0.0

    monkeypatch.setattr(clean, "process_item", process_item)
    threads = torch.get_num_threads()
    cfg = S2Config(
        stage="clean",
        seed=7,
        run_dir=str(tmp_path / "run"),
        data=DataConfig(path=str(raw)),
        clean=clean.CleanConfig(progress=False),
        judges=JudgesConfig(threads=1),
    )
    try:
        clean.run(cfg)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    [judges] = seen
    assert isinstance(judges, JudgeSuite) and judges.cfg is cfg.judges and judges.seed == 7
    assert built(judges) == set()  # each judge loads when the first recording needs it

    whisper = ASRConfig(backend="whisper", whisper=WhisperConfig(checkpoint=str(tmp_path / "absent.pt")))
    bad = replace(cfg, run_dir=str(tmp_path / "bad"), judges=replace(cfg.judges, asr=whisper))
    with pytest.raises(ValueError, match="absent.pt"):
        clean.run(bad)
    assert len(seen) == 1  # refused before any recording


@pytest.fixture(scope="module")
def seedtts_set(tmp_path_factory) -> Path:
    from data_pipeline.demo_corpus import write_seedtts_set

    root = tmp_path_factory.mktemp("seedtts")
    meta = write_seedtts_set(root / "set", 16000)
    system = root / "system"
    system.mkdir()
    shutil.copy(root / "set" / "wavs" / "awb-00.wav", system / "awb-00.wav")
    return meta


def test_eval_takes_its_judges_from_the_suite_and_loads_only_what_it_scores_with(
    seedtts_set, tmp_path, monkeypatch
):
    import eval.stage as eval_stage
    from eval.stage import EvalConfig
    from s2train.config import S2Config

    made = []

    class Recorded(JudgeSuite):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(eval_stage, "JudgeSuite", Recorded)
    e = EvalConfig(
        meta=str(seedtts_set),
        gen_dir=str(seedtts_set.parent.parent / "system"),
        profile="demo",
        limit=1,
        ground_truth=False,
        progress=False,
    )
    out = eval_stage.run(S2Config(stage="eval", run_dir=str(tmp_path / "eval"), eval=e))
    assert out["complete"] and out["asr_model"].startswith("pocketsphinx")
    [judges] = made
    assert built(judges) == {"asr", "embedder", "dnsmos"}
    assert isinstance(judges.asr, PocketSphinxASR) and isinstance(judges.embedder, ResemblyzerEmbedder)
    assert judges.cfg.device == "cpu" or judges.cfg.device.startswith("cuda")


def test_eval_maps_its_keys_onto_the_judges_config(tmp_path):
    from eval.stage import EvalConfig, judges_config
    from s2train.config import S2Config

    def mapped(**eval_keys) -> JudgesConfig:
        return judges_config(S2Config(stage="eval", eval=EvalConfig(device="cpu", **eval_keys)))

    official = mapped(whisper_hf="/m/whisper-large-v3", sim_checkpoint="/m/wavlm.pth")
    assert (official.asr.backend, official.asr.whisper_hf) == ("whisper_hf", "/m/whisper-large-v3")
    alternative = mapped(asr="whisper", whisper="/m/large-v3.pt")
    assert (alternative.asr.backend, alternative.asr.whisper.checkpoint) == ("whisper", "/m/large-v3.pt")
    f5 = mapped(profile="f5", faster_whisper="/m/faster-whisper-large-v3")  # as F5-TTS transcribes
    assert (f5.asr.backend, f5.asr.faster_whisper) == ("faster_whisper", "/m/faster-whisper-large-v3")
    assert (official.speaker.backend, official.speaker.checkpoint) == ("wavlm_ecapa", "/m/wavlm.pth")
    zh = mapped(lang="zh", paraformer="/m/paraformer-zh", sim="speechbrain", speechbrain="/m/ecapa")
    assert (zh.asr.backend, zh.asr.paraformer) == ("paraformer", "/m/paraformer-zh")
    assert (zh.speaker.backend, zh.speaker.checkpoint) == ("speechbrain", "/m/ecapa")
    demo = mapped(profile="demo")
    assert (demo.asr.backend, demo.speaker.backend, demo.device) == ("pocketsphinx", "resemblyzer", "cpu")
    with pytest.raises(ValueError, match="English only"):
        mapped(profile="demo", lang="zh")


# ------------------------------------------------------------------------------------------- layering


def test_the_judge_rate_is_spelt_out_once():
    """``JUDGE_RATE`` (``s2train/judges/__init__.py``) is the only 16000 in the judges; the import rules of
    the package are ``tests/test_layout.py``'s."""
    for path in sorted(JUDGES_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value == 16000:
                assert path.name == "__init__.py", f"{path.name}:{node.lineno} spells out the judge rate"
