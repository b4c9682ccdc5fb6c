"""Seed-TTS-Eval's official English ASR call on current transformers: the transcripts of the new backend
equal those the official call gave on transformers 4.40.2 (where it still runs), on a tiny random Whisper
in the released layout, for six clips at four sample rates: five run to the 448-token limit, one ends.
openai-whisper, the labelled alternative, gives the same transcripts from the same model in its layout.
The references were made by ``tests/fixtures/whisper_official/make_references.py`` (its docstring says
how); the model and clips are rebuilt here from the same seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import scipy.signal
import soundfile as sf

from tests.conftest import run_cli
from tests.whisper_tiny import save_model, save_openai_checkpoint, write_clips

REFERENCES = Path(__file__).resolve().parent / "fixtures" / "whisper_official" / "references.json"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("whisper_official")
    return save_model(root / "whisper-large-v3-tiny-random"), write_clips(root / "clips")


def test_the_official_call_is_reproduced_token_for_token(tiny):
    from s2train.judges.asr import TransformersWhisperASR

    folder, clips = tiny
    references = json.loads(REFERENCES.read_text())
    assert references["transformers"] == "4.40.2" and len(references["clips"]) >= 5
    asr = TransformersWhisperASR(folder)
    lengths = []
    for name, reference in references["clips"].items():
        wav, rate = sf.read(str(clips / f"{name}.wav"))
        if rate != 16000:  # as the official script resamples
            wav = scipy.signal.resample(wav, int(len(wav) * 16000 / rate))
        ids = asr.token_ids(wav)
        assert ids == reference["ids"], name
        assert asr.transcribe_window(wav) == reference["text"], name
        lengths.append(len(ids))
    assert lengths.count(448) >= 1 and min(lengths) < 448  # run-away transcripts hit the limit, one ends


def test_openai_whisper_in_its_layout_gives_the_official_transcripts_to_the_same_length(tiny, tmp_path):
    """Its length limit is the official call's (it stopped at 224 sampled tokens, the official at 444)."""
    from s2train.judges.asr import ASRConfig, WhisperASR, WhisperConfig

    folder, clips = tiny
    checkpoint = save_openai_checkpoint(folder, tmp_path / "large-v3-tiny-random.pt")
    asr = WhisperASR(ASRConfig(backend="whisper", whisper=WhisperConfig(checkpoint=str(checkpoint))))
    for name, reference in json.loads(REFERENCES.read_text())["clips"].items():
        wav, rate = sf.read(str(clips / f"{name}.wav"))
        if rate != 16000:
            wav = scipy.signal.resample(wav, int(len(wav) * 16000 / rate))
        assert asr.transcribe_window(wav.astype("float32"), "en") == reference["text"].strip(), name


def score_one(clips: Path, clip: str, tmp_path: Path, *overrides: str) -> tuple[dict, list[dict]]:
    """``stage=eval`` on a one-line meta list whose generated audio is ``clip``: results and scores."""
    meta = tmp_path / "meta.lst"
    meta.write_text(f"{clip}|A prompt.|{clips / 'clip-0.wav'}|Some words to say.\n")
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / f"{clip}.wav").write_bytes((clips / f"{clip}.wav").read_bytes())
    run_dir = tmp_path / "eval"
    run_cli("stage=eval", f"eval.meta={meta}", f"eval.gen_dir={gen}", f"eval.audio_dirs=[{clips}]",
            "eval.sim=none", "eval.dnsmos=false", f"run_dir={run_dir}", *overrides)  # fmt: skip
    scores = [json.loads(line) for line in (run_dir / "scores.jsonl").read_text().splitlines()]
    return json.loads((run_dir / "results.json").read_text()), scores


def test_the_official_profile_transcribes_with_it_by_default_and_says_so(tiny, tmp_path):
    folder, clips = tiny
    out, scores = score_one(clips, "clip-4", tmp_path, f"eval.whisper_hf={folder}")
    assert out["profile"] == "official" and "transformers, the official call" in out["asr_model"]
    assert "its ASR" not in out["comparable_reason"]
    reference = json.loads(REFERENCES.read_text())["clips"]["clip-4"]["text"]
    assert [s["hyp"] for s in scores] == [reference]


def test_the_f5_profile_transcribes_as_f5_tts_does_with_faster_whisper(tiny, tmp_path):
    """F5-TTS's call (faster-whisper, beam 5, English, the segments joined each after a space) on the same
    tiny Whisper converted to CTranslate2; the f5 profile uses it by default and says so."""
    import ctranslate2
    from ctranslate2.converters import TransformersConverter
    from faster_whisper import WhisperModel

    folder, clips = tiny
    ct2 = tmp_path / "faster-whisper-tiny-random"
    files = ["tokenizer.json", "preprocessor_config.json"]
    TransformersConverter(str(folder), copy_files=files).convert(str(ct2), quantization="float32")
    model = WhisperModel(str(ct2), device="cpu", compute_type="float32")
    ctranslate2.set_random_seed(0)  # the random model's transcripts fall back to sampling: seeded
    segments, _ = model.transcribe(str(clips / "clip-2.wav"), beam_size=5, language="en")
    f5_hypothesis = ""
    for segment in segments:  # F5-TTS's own join
        f5_hypothesis = f5_hypothesis + " " + segment.text
    out, scores = score_one(clips, "clip-2", tmp_path, "eval.profile=f5", f"eval.faster_whisper={ct2}")
    assert "faster-whisper" in out["asr_model"] and "its ASR" not in out["comparable_reason"]
    assert [s["hyp"] for s in scores] == [f5_hypothesis] and f5_hypothesis.startswith(" ")
