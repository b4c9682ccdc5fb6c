"""Training examples of every kind (plain, cloning, captioned, tagged, dialogue): each builds, token for
token, the prompt the inference engine builds for the same inputs; only the target's frames and its
closing <|im_end|> are trained; the mixing weights are honoured; a kind an utterance cannot make falls
back to plain."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from s2train.inference.engine import speech_request
from s2train.judges.captioner import load_bins, phrase_caption
from s2train.shards import write_tar
from s2train.text.prompt import IGNORE, build_prompt
from s2train.training.lm_data import KINDS, ExampleMix, LMDataConfig, TokenStream, open_token_source
from tests.test_lm_data import TOK, K, _npy

WORDS = "rain fell softly on the quiet harbour town before seven ships sailed north".split()


def write_rich_shards(
    folder: Path, n_shards: int = 2, per_shard: int = 12, seed: int = 0, sizes=(64, 32, 32, 32)
) -> None:
    """Token shards whose utterances carry what every kind needs: captions, tags on the ASR's words, two
    recordings of several speakers each; codebooks of ``sizes`` entries (and the tokenize run's
    ``stats.json`` saying so)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stats.json").write_text(json.dumps({"codebook_sizes": list(sizes)}))
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            key, frames = f"s{s}u{i}", int(rng.integers(3, 12))
            codes = np.stack([rng.integers(0, size, frames) for size in sizes])
            words = list(rng.choice(WORDS, int(rng.integers(3, 7))))
            meta = {
                "id": key,
                "text": " ".join(words),
                "asr_text": " ".join(words),
                "speaker": f"spk{i % 3}",
                "source": f"rec{s}-{i % 2}.wav",
                "caption": f"A {['slow', 'fast', 'quiet'][i % 3]} voice.",
                "tags": [{"tag": "[pause]", "word_index": 1}, {"tag": "[emphasis]", "word_index": 2}],
            }
            members += [
                (f"{key}.codes.npy", _npy(codes.astype(np.uint16))),
                (f"{key}.json", json.dumps(meta).encode()),
            ]
        write_tar(folder / "shards" / f"tokens-{s:06d}.tar", members)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("rich_tokens")
    write_rich_shards(folder)
    return folder


def stream_of(folder: Path, **mix) -> TokenStream:
    cfg = LMDataConfig(max_len=400, loop=False, mix=ExampleMix(**{"plain": 0.0, **mix}))
    return TokenStream(open_token_source(folder), TOK, K, cfg, seed=3)


def examples(stream: TokenStream, epochs: int = 1):
    for epoch in range(epochs):
        yield from examples_at(stream, epoch)


def examples_at(stream: TokenStream, epoch: int):
    for u, groups, where in stream._utterances(epoch, 0, 1):
        yield stream.example(u, groups, where)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_builds_the_prompt_inference_builds(shards, kind):
    stream = stream_of(shards, **{kind: 1.0})
    made = list(examples(stream))
    assert made and all(e.kind == kind for e in made)
    for e in made[:6]:
        codes = torch.from_numpy(e.codes.astype(np.int64))
        train = build_prompt(TOK, e.text, K, codes=codes, references=e.references, caption=e.caption)
        infer = speech_request(TOK, e.text, K, references=e.references, caption=e.caption).prompt
        n = infer.shape[1]
        assert torch.equal(train.tokens[:, :n], infer)  # the prefix the engine builds, token for token
        # trained: exactly the target's frames and its closing <|im_end|>, nothing of the references
        assert train.trained.tolist() == [False] * n + [True] * (e.codes.shape[1] + 1)
        segment = stream._segment(e)
        trained_labels = (segment.labels[0] != IGNORE).sum().item()
        assert trained_labels == e.codes.shape[1] + 1
        text = TOK.decode(infer[0].tolist())
        if kind == "cloning":
            assert len(e.references) == 1 and "Speech:\n" in text
        if kind == "captioned":
            assert e.caption and text.startswith(f"<|im_start|>system\n{e.caption}\n\n")
        if kind == "tagged":
            assert "[pause]" in e.text and "[emphasis]" in e.text
        if kind == "dialogue":
            assert "<|speaker:0|>" in e.text and "<|speaker:1|>" in e.text
            assert e.codes.shape[1] > 0 and "+" in e.key


def test_dialogue_pairs_voices_of_one_recording_with_a_reference_each(shards):
    for e in examples(stream_of(shards, dialogue=1.0)):
        first, second = e.key.split("+")
        assert first != second and len(e.references) == 2
        texts = [r.text for r in e.references]
        assert all(texts)


def test_mixing_weights_are_honoured(shards):
    weights = {"plain": 1.0, "cloning": 2.0, "captioned": 1.0, "tagged": 0.5, "dialogue": 0.5}
    stream = stream_of(shards, **weights)
    counts = dict.fromkeys(KINDS, 0)
    for e in examples(stream, epochs=150):  # 24 utterances an epoch: 3,600 examples
        counts[e.kind] += 1
    total = sum(counts.values())
    assert total == 3600
    for kind, weight in weights.items():
        assert abs(counts[kind] / total - weight / 5.0) < 0.025, counts


def test_a_kind_an_utterance_cannot_make_falls_back_to_plain(tmp_path):
    folder = tmp_path / "bare"
    members = []
    for i in range(3):  # one speaker alone in the shard, no caption, text not the ASR's
        codes = np.zeros((K, 4), np.uint16)
        meta = {
            "id": f"u{i}",
            "text": f"Word {i}.",
            "speaker": "solo",
            "tags": [{"tag": "[pause]", "word_index": 1}],
        }
        members += [(f"u{i}.codes.npy", _npy(codes)), (f"u{i}.json", json.dumps(meta).encode())]
    write_tar(folder / "shards" / "tokens-000000.tar", members)
    for kind in ("captioned", "tagged", "dialogue"):
        assert {e.kind for e in examples(stream_of(folder, **{kind: 1.0}))} == {"plain"}
    assert {e.kind for e in examples(stream_of(folder, cloning=1.0))} == {"cloning"}


def test_a_voice_is_never_cloned_from_a_clip_of_the_same_words(tmp_path):
    """The same sentence at two paces and one other sentence, all one speaker's: each copy of the sentence
    clones the voice from the other sentence (never from its twin, as no inference prompt would); a
    speaker whose other clips all say the same words makes plain examples."""
    folder = tmp_path / "paces"
    members = []
    for i, (text, frames) in enumerate([("Same words.", 4), ("Same words.", 8), ("Other words.", 5)]):
        meta = {"id": f"u{i}", "text": text, "speaker": "solo"}
        members += [
            (f"u{i}.codes.npy", _npy(np.full((K, frames), i, np.uint16))),
            (f"u{i}.json", json.dumps(meta).encode()),
        ]
    write_tar(folder / "shards" / "tokens-000000.tar", members)
    made = list(examples(stream_of(folder, cloning=1.0), 4))
    twins = [e for e in made if e.text == "Same words."]
    assert len(twins) == 8 and all(e.kind == "cloning" for e in twins)
    assert all(len(e.references) == 1 and e.references[0].text == "Other words." for e in twins)
    alone = tmp_path / "alone"
    write_tar(alone / "shards" / "tokens-000000.tar", members[:4])  # the twins only
    assert {e.kind for e in examples(stream_of(alone, cloning=1.0))} == {"plain"}


def test_rephrased_captions_say_the_same_in_other_words(tmp_path):
    """With ``lm_data.rephrase_captions`` a captioned example's caption is phrased anew from the
    captioner's measurements, in a template drawn each time: the words the bins give (pace, pitch,
    gender, recording) stay, the wording changes; an utterance without measurements keeps its caption."""
    bins = load_bins("v2")
    measures = {
        "pitch_hz": 110.0,
        "pitch_std": 5.0,
        "speaking_rate": 2.5,
        "snr_db": 40.0,
        "bandwidth_hz": 8000.0,
    }
    members = []
    for i, extra in enumerate([measures, {}]):
        meta = {
            "id": f"u{i}",
            "text": f"Words {i}.",
            "speaker": "solo",
            "caption": "As clean wrote it.",
            **extra,
        }
        members += [
            (f"u{i}.codes.npy", _npy(np.zeros((K, 4), np.uint16))),
            (f"u{i}.json", json.dumps(meta).encode()),
        ]
    write_tar(tmp_path / "shards" / "tokens-000000.tar", members)
    cfg = LMDataConfig(
        max_len=400, loop=False, mix=ExampleMix(plain=0.0, captioned=1.0), rephrase_captions="v2"
    )
    stream = TokenStream(open_token_source(tmp_path), TOK, K, cfg, seed=3)
    made = [e for epoch in range(12) for e in examples_at(stream, epoch)]
    rephrased = {e.caption for e in made if e.key == "u0"}
    assert {e.caption for e in made if e.key == "u1"} == {"As clean wrote it."}
    assert len(rephrased) >= 3  # several templates over 12 draws
    assert rephrased <= {phrase_caption(bins, measures, pick) for pick in range(len(bins["templates"]))}
    for caption in rephrased:  # whatever the template, what it says is the measurements' words
        assert "male speaker" in caption and "low-pitched" in caption and "clean" in caption
        if "pace" in caption or "delivery" in caption:  # 2.5 syllables/s: slow, in every template naming it
            assert "slow" in caption and "moderate" not in caption and "fast" not in caption
    again = TokenStream(open_token_source(tmp_path), TOK, K, cfg, seed=3)  # a resumed run draws the same
    assert [e.caption for epoch in range(12) for e in examples_at(again, epoch)] == [e.caption for e in made]


def test_resumed_epochs_draw_the_same_kinds(shards):
    first = [
        (e.key, e.kind, e.text) for e in examples(stream_of(shards, plain=1.0, cloning=1.0, dialogue=1.0), 3)
    ]
    again = [
        (e.key, e.kind, e.text) for e in examples(stream_of(shards, plain=1.0, cloning=1.0, dialogue=1.0), 3)
    ]
    assert first == again and len({k for _, k, _ in first}) == 3


def test_tags_go_into_the_known_transcript_when_its_words_are_the_asrs():
    from s2train.training.lm_data import TokenUtterance, _build_example

    tags = ({"tag": "[long pause]", "word_index": 2}, {"tag": "[emphasis]", "word_index": 3})
    codes = np.zeros((K, 3), np.int64)
    u = TokenUtterance(
        "k", "spk", "Rain fell, softly today.", codes, tags=tags, asr_text="rain fell softly today"
    )
    made = _build_example("tagged", u, {"spk": [u]}, np.random.default_rng(0))
    assert made.text == "Rain fell, [long pause] softly [emphasis] today."
    other = TokenUtterance("k", "spk", "Rain fell softly.", codes, tags=tags, asr_text="rain fell swiftly")
    assert _build_example("tagged", other, {"spk": [other]}, np.random.default_rng(0)) is None


def test_held_out_recordings_are_never_trained_on_and_the_target_speaker_can_be_named(shards):
    cfg = LMDataConfig(
        max_len=400,
        loop=False,
        mix=ExampleMix(plain=1.0, cloning=1.0),
        speaker_ids={"spk1": 2},
        exclude_sources=["rec0-*"],
    )
    stream = TokenStream(open_token_source(shards), TOK, K, cfg, seed=3)
    made = list(examples(stream))
    everything = list(examples(stream_of(shards, plain=1.0)))
    held = {e.key for e in everything if e.key.startswith("s0")}  # shard 0's recordings are rec0-0, rec0-1
    assert held and made and not {e.key for e in made} & held
    assert len(made) == len(everything) - len(held)
    for e in made:  # nor does any reference come from a held-out recording
        assert all(r.text for r in e.references)
        prompt = TOK.decode(stream._segment(e).inputs[0].tolist())
        user = prompt[prompt.index("<|im_start|>user\n") :]
        tag = "<|speaker:2|>" if e.speaker == "spk1" else "<|speaker:0|>"  # the target's voice
        assert user.startswith(f"<|im_start|>user\n{tag}")
    held_codes = {e.codes.tobytes() for e in everything if e.key in held}
    cloned = [e for e in made if e.kind == "cloning"]
    assert cloned and all(
        np.asarray(r.codes).astype(e.codes.dtype).tobytes() not in held_codes
        for e in cloned
        for r in e.references
    )


def test_a_speaker_can_have_a_mix_of_its_own(shards):
    cfg = LMDataConfig(
        max_len=400,
        loop=False,
        mix=ExampleMix(plain=1.0),
        speaker_mix={"spk1": ExampleMix(plain=0.0, cloning=1.0)},
    )
    made = list(examples(TokenStream(open_token_source(shards), TOK, K, cfg, seed=3)))
    ones = [e for e in made if e.speaker == "spk1"]
    assert ones and all(e.kind == "cloning" for e in ones)  # each has another spk1 clip in its shard
    assert all(e.kind == "plain" for e in made if e.speaker != "spk1")


def test_utterances_at_a_marked_pace_can_have_a_mix_of_their_own(tmp_path):
    """``lm_data.pace_mix``: an utterance whose measured speaking rate the caption bins call slow or fast
    takes that word's mix; a moderate one, or one without a measured rate, takes ``mix``."""
    rates = [2.0, 7.0, 4.2, None]  # v2's pace bins: slow below 3.2, fast above 5.2
    members = []
    for i, rate in enumerate(rates):
        meta = {
            "id": f"u{i}",
            "text": f"Words {i}.",
            "speaker": "solo",
            "caption": "A voice.",
            "pitch_hz": 120.0,
        }
        if rate is not None:
            meta["speaking_rate"] = rate
        members += [
            (f"u{i}.codes.npy", _npy(np.zeros((K, 4), np.uint16))),
            (f"u{i}.json", json.dumps(meta).encode()),
        ]
    write_tar(tmp_path / "shards" / "tokens-000000.tar", members)
    captioned = ExampleMix(plain=0.0, captioned=1.0)
    cfg = LMDataConfig(
        max_len=400,
        loop=False,
        mix=ExampleMix(plain=1.0),
        rephrase_captions="v2",
        pace_mix={"slow": captioned, "fast": captioned},
    )
    stream = TokenStream(open_token_source(tmp_path), TOK, K, cfg, seed=3)
    kinds = {}
    for epoch in range(5):
        for e in examples_at(stream, epoch):
            kinds.setdefault(e.key, set()).add(e.kind)
    assert kinds == {"u0": {"captioned"}, "u1": {"captioned"}, "u2": {"plain"}, "u3": {"plain"}}
    with pytest.raises(ValueError, match="rephrase_captions"):  # the rate is binned by those bins
        LMDataConfig(pace_mix={"slow": captioned})
