"""ASR judges: pocketsphinx on flite speech, whisper from a tiny random checkpoint in openai-whisper's
own format loaded through the config path a user would use, and the hallucination filters."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from s2train.judges.asr import (
    ASRConfig,
    PocketSphinxASR,
    Transcript,
    WhisperConfig,
    build_asr,
    compression_ratio,
    max_ngram_repeat,
    transcript_checks,
)
from s2train.judges.wer import wer

SENTENCE = "Please put the green box on the table near the window."


def test_pocketsphinx_transcribes_flite_speech_with_word_times(flite_wav):
    wav = flite_wav("rms", SENTENCE)
    [t] = PocketSphinxASR(ASRConfig())([wav], ["en"])
    assert t.supported and t.lang == "en"
    assert wer([SENTENCE], [t.text]) <= 0.2, t.text
    assert t.words and all(0 <= w.start < w.end <= len(wav) / 16000 + 0.05 for w in t.words)
    assert [w.start for w in t.words] == sorted(w.start for w in t.words)


def test_pocketsphinx_scores_each_utterance_afresh(flite_wav):
    asr = PocketSphinxASR(ASRConfig())
    a, b = flite_wav("slt", SENTENCE), flite_wav("awb", "The cat sleeps on the sofa for most of the day.")
    alone = asr([b], ["en"])[0].text
    after = asr([a, b], ["en", "en"])[1].text
    assert alone == after


def test_pocketsphinx_workers_hear_what_one_process_hears(flite_wav):
    wavs = [
        flite_wav("slt", SENTENCE),
        np.zeros(0, np.float32),  # a generation that ended at once
        flite_wav("awb", "The cat sleeps on the sofa for most of the day."),
        flite_wav("rms", SENTENCE),
    ]
    langs = ["en", "en", "cmn", "en"]
    alone = PocketSphinxASR(ASRConfig())(wavs, langs)
    pooled = PocketSphinxASR(ASRConfig(workers=2))(wavs, langs)
    assert pooled == alone  # in order, word times and all, the unsupported language left alone
    assert alone[0].text and alone[1].text == "" and not alone[2].supported


def test_pocketsphinx_leaves_other_languages_untranscribed():
    [t] = PocketSphinxASR(ASRConfig())([np.zeros(16000, np.float32)], ["cmn"])
    assert not t.supported and t.text == ""
    reason, _ = transcript_checks(t, ASRConfig())
    assert reason is None  # kept as audio-only material, not judged


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty_transcript"),
        ("the the the the the the the", "repeated_ngram"),
        ("go home go home go home go home go home now", "repeated_ngram"),
        ("a b a b c a b c a b c a b c a c b a c b", "low_unique_word_ratio"),
        ("and that is all thank you for watching", "phantom_phrase"),
        ("a perfectly ordinary sentence about the weather today", None),
    ],
)
def test_transcript_filters(text, reason):
    got, values = transcript_checks(Transcript(text=text, lang="en"), ASRConfig())
    assert got == reason, values


def test_compression_ratio_and_logprob_filters():
    cfg = ASRConfig(max_ngram_repeats=100, min_unique_word_ratio=0.0)
    looping = "it was a bright cold day in april and " * 6
    assert compression_ratio(looping) > 2.4 > compression_ratio("it was a bright cold day in april")
    assert transcript_checks(Transcript(text=looping, lang="en"), cfg)[0] == "high_compression_ratio"
    unsure = Transcript(text="it was a bright cold day", lang="en", avg_logprob=-1.7)
    assert transcript_checks(unsure, cfg)[0] == "low_avg_logprob"
    assert (
        transcript_checks(
            Transcript(text="bonjour tout le monde", lang="fr"), dataclasses.replace(cfg, languages=["en"])
        )[0]
        == "language"
    )


def test_max_ngram_repeat_counts_back_to_back_runs():
    assert max_ngram_repeat("a b c d".split()) == 1
    assert max_ngram_repeat("x y x y x y z".split()) == 3
    assert max_ngram_repeat("one two three one two three".split()) == 2


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    """A random, tiny multilingual whisper saved exactly as openai-whisper saves its checkpoints."""
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(0)
    dims = ModelDimensions(
        n_mels=80,
        n_audio_ctx=1500,
        n_audio_state=32,
        n_audio_head=2,
        n_audio_layer=1,
        n_vocab=51865,
        n_text_ctx=64,
        n_text_state=32,
        n_text_head=2,
        n_text_layer=1,
    )
    model = Whisper(dims)
    with torch.no_grad():  # whisper leaves some tensors uninitialised (torch.empty) for checkpoints to fill
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
    path = tmp_path_factory.mktemp("whisper") / "tiny-random.pt"
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": model.state_dict()}, path)
    return path


def test_whisper_backend_loads_a_local_checkpoint_and_transcribes(tiny_whisper, flite_wav):
    cfg = ASRConfig(backend="whisper", whisper=WhisperConfig(checkpoint=str(tiny_whisper)))
    asr = build_asr(cfg)
    assert asr.model.dims.n_audio_state == 32
    [t] = asr([flite_wav("awb", SENTENCE)], [None])
    assert isinstance(t.text, str) and t.lang is not None
    assert t.lang_prob is not None and 0.0 <= t.lang_prob <= 1.0
    reason, values = transcript_checks(t, cfg)
    assert set(values) >= {"compression_ratio", "avg_logprob", "unique_word_ratio"}


def test_whisper_backend_refuses_hub_names_and_missing_files(tmp_path):
    for checkpoint in ("large-v3", str(tmp_path / "absent.pt"), None):
        with pytest.raises(ValueError, match="local openai-whisper checkpoint"):
            build_asr(ASRConfig(backend="whisper", whisper=WhisperConfig(checkpoint=checkpoint)))


def test_pocketsphinx_hears_nothing_in_empty_or_silent_audio():
    import numpy as np

    from s2train.judges.asr import ASRConfig, PocketSphinxASR

    empty, silent = PocketSphinxASR(ASRConfig())(
        [np.zeros(0, np.float32), np.zeros(800, np.float32)], ["en", "en"]
    )
    assert (empty.text, empty.words, silent.text) == ("", [], "")
