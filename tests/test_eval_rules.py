"""Seed-TTS-Eval's text rules (``eval.seedtts``) and meta lists (``eval.meta``) on cases written here."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval import seedtts
from eval.meta import present, read_meta

OFFICIAL = seedtts.PROFILES["official"]
F5 = seedtts.PROFILES["f5"]


def wer(ref: str, hyp: str, lang: str = "en", rules=OFFICIAL) -> float:
    return seedtts.score_utterance("u", ref, hyp, lang, rules).wer


@pytest.mark.parametrize(
    ("text", "lang", "expected"),
    [
        # ASCII and CJK punctuation deleted, not replaced by a space; the ASCII apostrophe kept
        ("Hello, World! It's me.", "en", "hello world it's me"),
        (
            "“Great” — isn't it?",
            "en",
            "great isn't it",
        ),  # curly quotes and the em dash go, then 2 spaces -> 1
        ("It’s", "en", "its"),  # the curly apostrophe is punctuation: deleted
        ("co-op well-known", "en", "coop wellknown"),  # hyphens join the halves
        ("3.5 kg, 1,000 people, 20%", "en", "35 kg 1000 people 20"),
        ("Mr. Smith lives in the U.S.A.", "en", "mr smith lives in the usa"),
        (
            "ＡＢＣ，ｄｅｆ",
            "en",
            "ａｂｃｄｅｆ",
        ),  # full-width letters are only lowercased, full-width comma deleted
        ("a   b", "en", "a  b"),  # one pass of "  " -> " ": three spaces become two
        ("你好，世界！", "zh", "你 好 世 界"),
        (
            "我用iPhone拍照。",
            "zh",
            "我 用 i P h o n e 拍 照",
        ),  # Latin letters become characters too, case kept
        ("你好　世界", "zh", "你 好 世 界"),  # the ideographic space is zhon punctuation
        ("「對」『吧』《書》", "zh", "對 吧 書"),  # references are not converted to simplified characters
    ],
)
def test_official_normaliser(text, lang, expected):
    assert seedtts.normalize(text, lang, OFFICIAL) == expected


def test_f5_profile_also_deletes_the_ascii_apostrophe():
    assert seedtts.normalize("It's Bob's", "en", F5) == "its bobs"
    assert wer("It's fine", "its fine", rules=F5) == 0.0
    assert wer("It's fine", "its fine") == 0.5  # official: "it's" and "its" differ


def test_straight_and_curly_apostrophes_differ_in_the_official_rules():
    assert wer("It's fine.", "It’s fine.") == 0.5
    assert wer("It's fine.", "it's FINE!") == 0.0


def test_chinese_hypothesis_goes_through_zhconv_but_the_reference_does_not():
    assert wer("我们说话", "我們說話", "zh") == 0.0  # the hypothesis is simplified first
    assert wer("我們說話", "我們說話", "zh") == 0.75  # the traditional reference stays: 們 說 話 mismatch


def test_mixed_chinese_and_english_is_scored_character_by_character():
    # reference "我 用 i P h o n e" (8 tokens); the hypothesis writes "iphone": 1 substitution (P -> p)
    assert wer("我用iPhone", "我用iphone", "zh") == pytest.approx(1 / 8)
    # spaces between Latin words collapse in jiwer's transform
    assert wer("用 AI 说", "用AI说", "zh") == 0.0


def test_numbers_and_abbreviations_are_not_normalised():
    assert wer("I have 20 apples", "I have twenty apples") == 0.25
    assert wer("Dr. Who", "doctor who") == 0.5


def test_empty_hypothesis_is_all_deletions_and_wer_is_not_clipped():
    assert wer("one two three", "") == 1.0
    assert wer("one", "one two three four") == 3.0  # insertions push it past 100%


def test_empty_reference_is_refused():
    with pytest.raises(ValueError, match="reference is empty"):
        seedtts.score_utterance("u", "?!。", "hello", "en", OFFICIAL)


def test_error_ratios_count_reference_pieces_as_the_official_script_does():
    s = seedtts.score_utterance("u", "a b c d", "a x c", "en", OFFICIAL)
    assert (s.sub, s.dele, s.ins, s.errors, s.ref_words) == (0.25, 0.25, 0.0, 2, 4)
    # zh: the space character becomes a piece of its own in ref.split(" "), jiwer ignores it
    s = seedtts.score_utterance("u", "好 吧", "好吗", "zh", OFFICIAL)
    assert s.ref_norm == "好   吧" and s.ref_words == 2 and s.wer == 0.5
    assert s.sub == pytest.approx(1 / 4)  # "好   吧".split(" ") has 4 pieces


def test_the_figure_is_the_mean_of_utterances_not_the_corpus_wer():
    scores = [
        seedtts.score_utterance("short", "hello world", "hello", "en", OFFICIAL),  # 1/2
        seedtts.score_utterance(
            "long", " ".join("abcdefghij"), " ".join("abcdefghij"), "en", OFFICIAL
        ),  # 0/10
    ]
    summary = seedtts.summarize(scores, OFFICIAL)
    assert summary["wer"] == 25.0
    assert summary["corpus_wer_not_official"] == pytest.approx(100 / 12, abs=1e-3)
    assert summary["utterances"] == 2


def test_rounding_of_each_profile():
    values = [1 / 3, 0.0, 0.01254]
    assert OFFICIAL.figure(values) == 11.529  # round(mean * 100, 3) of 0.1152911
    assert F5.figure(values) == 11.529  # round(mean, 5) = 0.11529, printed as a fraction
    assert F5.figure([0.0125449]) == 1.254 and OFFICIAL.figure([0.0125449]) == 1.254
    assert F5.figure([0.012345678]) == 1.235 and OFFICIAL.figure([0.012345678]) == 1.235
    assert OFFICIAL.figure([0.0123456]) == 1.235
    assert seedtts.sim_figure([0.7, 0.75, 0.7501], OFFICIAL) == 0.733  # mean 0.733367
    assert seedtts.sim_figure([0.7, 0.75, 0.7501], F5) == 0.73337


def test_unknown_language_and_profile_are_refused():
    with pytest.raises(ValueError, match="en and zh"):
        seedtts.normalize("hola", "es", OFFICIAL)
    with pytest.raises(ValueError, match="profiles"):
        seedtts.profile("seed")


# ---------------------------------------------------------------------------------------- meta lists


def test_meta_with_four_and_five_fields(tmp_path):
    meta = tmp_path / "en" / "meta.lst"
    meta.parent.mkdir()
    meta.write_text(
        "u1|Prompt one.|prompt-wavs/a.wav|Target one.\n\nu2|Prompt two.|/abs/b.wav|Target two.|wavs/u2.wav\n",
        encoding="utf-8",
    )
    items = read_meta(meta, [meta.parent, Path("/abs")])  # eval.audio_dirs allows the absolute path
    assert [i.utt for i in items] == ["u1", "u2"]
    assert items[0].prompt_wav == meta.parent.resolve() / "prompt-wavs" / "a.wav"
    assert items[0].gt_wav is None and items[0].target_text == "Target one."
    assert str(items[1].prompt_wav) == "/abs/b.wav"  # absolute paths stay (inside an allowed folder)
    assert items[1].gt_wav == meta.parent.resolve() / "wavs" / "u2.wav"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("u1|only|three", "3 '|'-separated fields"),
        ("a|b|c|d|e|f", "6 '|'-separated fields"),
        ("../x|p|w.wav|t", "cannot name a file"),
    ],
)
def test_bad_meta_lines_are_refused_with_the_line_number(tmp_path, line, message):
    meta = tmp_path / "meta.lst"
    meta.write_text(f"ok|p|w.wav|t\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as error:
        read_meta(meta)
    assert "line 2" in str(error.value)


def test_repeated_utterance_and_missing_list_are_refused(tmp_path):
    meta = tmp_path / "meta.lst"
    meta.write_text("u|p|w.wav|t\nu|p|w.wav|t\n", encoding="utf-8")
    with pytest.raises(ValueError, match="listed twice"):
        read_meta(meta)
    with pytest.raises(ValueError, match="not a file"):
        read_meta(tmp_path / "absent.lst")


def test_missing_generated_files_are_skipped_and_counted(tmp_path):
    meta = tmp_path / "meta.lst"
    meta.write_text("".join(f"u{i}|p|w.wav|t\n" for i in range(4)), encoding="utf-8")
    gen = tmp_path / "gen"
    gen.mkdir()
    for i in (0, 2):
        (gen / f"u{i}.wav").write_bytes(b"")
    found, skipped = present(read_meta(meta), gen)
    assert [i.utt for i in found] == ["u0", "u2"]
    assert skipped == ["u1", "u3"]


def _f5_code_path(rows: list[tuple[str, str, str]]) -> float:
    """F5-TTS's WER (``run_asr_wer`` and its caller in ``f5_tts/eval``), written here from its description:
    every character of zhon's and ASCII punctuation replaced by nothing, one pass of double space to
    single, English lowercased, Chinese hypotheses simplified and both sides split into characters; jiwer
    per utterance; the mean rounded to 5 decimals of the fraction."""
    import string

    import jiwer
    import numpy as np
    import zhconv
    from zhon.hanzi import punctuation

    values = []
    for lang, truth, hypo in rows:
        for x in punctuation + string.punctuation:
            truth = truth.replace(x, "")
            hypo = hypo.replace(x, "")
        truth, hypo = truth.replace("  ", " "), hypo.replace("  ", " ")
        if lang == "zh":
            hypo = zhconv.convert(hypo, "zh-cn")
            truth, hypo = " ".join(truth), " ".join(hypo)
        else:
            truth, hypo = truth.lower(), hypo.lower()
        values.append(jiwer.process_words(truth, hypo).wer)
    return round(float(np.mean(values)), 5)


F5_CASES = [
    ("en", "It's Bob's well-known cafe, isn't it?", " its bobs wellknown cafe isn't it"),
    ("en", "“Great” — she said.  Twice!", " Great she said twice"),
    ("en", "Numbers: 3.5 kg, 20%.", " numbers 35 kilograms 20"),
    ("en", "A completely different sentence.", " nothing alike at all here"),
    ("zh", "我們說話，好嗎？", "我们说话好吗"),
    ("zh", "我用iPhone拍照。", "我用 iphone 拍照"),
]


def test_the_f5_profile_gives_f5_tts_figures_on_stored_transcripts(tmp_path):
    import json

    from tests.conftest import run_cli

    rows = [
        {"utt": f"u{i}", "lang": lang, "ref": ref, "hyp": hyp} for i, (lang, ref, hyp) in enumerate(F5_CASES)
    ]
    (tmp_path / "asr.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    run_cli("stage=eval", "eval=transcripts", f"eval.input={tmp_path / 'asr.jsonl'}", "eval.profile=f5",
            f"run_dir={tmp_path / 'eval'}")  # fmt: skip
    out = json.loads((tmp_path / "eval" / "results.json").read_text())
    f5 = _f5_code_path(F5_CASES)
    assert out["wer"] == round(f5 * 100, 3)  # F5 prints the fraction; the figure here is in percent
    for lang in ("en", "zh"):
        assert out["wer_by_lang"][lang] == round(
            _f5_code_path([c for c in F5_CASES if c[0] == lang]) * 100, 3
        )
    official = seedtts.summarize(
        [seedtts.score_utterance("u", ref, hyp, lang, OFFICIAL) for lang, ref, hyp in F5_CASES], OFFICIAL
    )["wer"]
    assert official != out["wer"]  # the apostrophes count under the official rules
