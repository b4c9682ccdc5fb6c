"""Seed-TTS-Eval's text rules: the normaliser, per-utterance WER and the averaging, in two profiles.

``official`` follows BytedanceSpeech/seed-tts-eval (``run_wer.py`` + ``average_wer.py``):

- the hypothesis of a Chinese utterance is converted to simplified characters (``zhconv``, ``zh-cn``)
  before anything else; the reference is left as it is;
- every character of ``zhon.hanzi.punctuation + string.punctuation`` is deleted from reference and
  hypothesis alike, except the ASCII apostrophe (curly quotes and apostrophes are deleted);
- each double space is replaced by one space, in a single pass (three spaces become two);
- Chinese: every character, spaces and Latin letters included, is joined with spaces; English: lowercase;
- WER is jiwer's word alignment with its default transform (collapse runs of spaces, strip, split), not
  clipped at 1; the reported figure is ``round(np.mean(per_utterance) * 100, 3)``, numpy's rounding.

``f5`` follows F5-TTS's harness (``f5_tts/eval/utils_eval.py``): the same rules except that the ASCII
apostrophe is deleted too, and the figure is the mean rounded to 5 decimals (reported here in percent).

Nothing else is normalised: numbers, abbreviations, hyphenated words and full-width letters stay as the
ASR wrote them, which is what makes the published figures comparable with each other.
"""

from __future__ import annotations

import string
import warnings
from dataclasses import dataclass
from functools import lru_cache

import jiwer
import numpy as np

LANGS = ("en", "zh")


@dataclass(frozen=True)
class Profile:
    name: str
    keep_apostrophe: bool  # the ASCII ' survives normalisation
    mean_decimals: int  # decimals the mean is rounded to, in the unit the harness prints
    mean_in_percent: bool  # the harness prints the mean times 100

    def figure(self, values: list[float]) -> float:
        """The reported WER in percent from per-utterance fractions, rounded as the harness rounds it."""
        if not values:
            raise ValueError("no utterance to average")
        mean = np.mean(values)
        if self.mean_in_percent:
            return float(round(mean * 100, self.mean_decimals))
        return round(float(round(mean, self.mean_decimals)) * 100, self.mean_decimals - 2)


PROFILES = {
    "official": Profile("official", keep_apostrophe=True, mean_decimals=3, mean_in_percent=True),
    "f5": Profile("f5", keep_apostrophe=False, mean_decimals=5, mean_in_percent=False),
}


def profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown eval profile {name!r}; the profiles are {sorted(PROFILES)}")
    return PROFILES[name]


@lru_cache(maxsize=2)
def _deleted(keep_apostrophe: bool) -> dict[int, None]:
    from zhon.hanzi import punctuation

    chars = set(punctuation + string.punctuation)
    if keep_apostrophe:
        chars.discard("'")
    return {ord(c): None for c in chars}


def prepare_hypothesis(raw: str, lang: str) -> str:
    """What the harness does to the ASR output before normalising: zh -> simplified characters."""
    if lang == "zh":
        with warnings.catch_warnings():  # zhconv imports pkg_resources, which warns on import
            warnings.simplefilter("ignore", UserWarning)
            import zhconv

        return zhconv.convert(raw, "zh-cn")
    return raw


def normalize(text: str, lang: str, rules: Profile) -> str:
    """The harness's normaliser (the same for reference and hypothesis)."""
    if lang not in LANGS:
        raise ValueError(f"Seed-TTS-Eval scores en and zh, not {lang!r}")
    text = text.translate(_deleted(rules.keep_apostrophe)).replace("  ", " ")
    return " ".join(text) if lang == "zh" else text.lower()


@dataclass(frozen=True)
class UtteranceScore:
    utt: str
    lang: str
    ref: str  # as given
    hyp: str  # as the ASR gave it (before zhconv)
    ref_norm: str
    hyp_norm: str
    wer: float  # a fraction, unclipped
    sub: float  # substitutions, deletions and insertions over the reference's length as the official
    dele: float  # script counts it (``ref.split(" ")`` of the normalised text, empty pieces included)
    ins: float
    errors: int  # substitutions + deletions + insertions
    ref_words: int  # words after jiwer's transform

    def row(self) -> dict:
        return {
            "utt": self.utt,
            "lang": self.lang,
            "wer": self.wer,
            "ref": self.ref,
            "hyp": self.hyp,
            "ref_norm": self.ref_norm,
            "hyp_norm": self.hyp_norm,
            "sub": self.sub,
            "del": self.dele,
            "ins": self.ins,
            "errors": self.errors,
            "ref_words": self.ref_words,
        }


def score_utterance(utt: str, ref: str, hyp: str, lang: str, rules: Profile) -> UtteranceScore:
    ref_norm = normalize(ref, lang, rules)
    hyp_norm = normalize(prepare_hypothesis(hyp, lang), lang, rules)
    if not ref_norm.strip():
        raise ValueError(f"utterance {utt}: the reference is empty after normalisation ({ref!r})")
    out = jiwer.process_words(ref_norm, hyp_norm)
    pieces = len(ref_norm.split(" "))
    errors = out.substitutions + out.deletions + out.insertions
    return UtteranceScore(
        utt=utt,
        lang=lang,
        ref=ref,
        hyp=hyp,
        ref_norm=ref_norm,
        hyp_norm=hyp_norm,
        wer=float(out.wer),
        sub=out.substitutions / pieces,
        dele=out.deletions / pieces,
        ins=out.insertions / pieces,
        errors=errors,
        ref_words=out.hits + out.substitutions + out.deletions,
    )


def summarize(scores: list[UtteranceScore], rules: Profile) -> dict:
    """The harness's figure (mean of per-utterance WER) and, labelled as not official, the corpus WER."""
    values = [s.wer for s in scores]
    words = sum(s.ref_words for s in scores)
    return {
        "wer": rules.figure(values),
        "utterances": len(scores),
        "sub": float(round(np.mean([s.sub for s in scores]) * 100, 3)),
        "del": float(round(np.mean([s.dele for s in scores]) * 100, 3)),
        "ins": float(round(np.mean([s.ins for s in scores]) * 100, 3)),
        "wer_below_50_share": round(sum(v <= 0.5 for v in values) / len(values), 4),
        "corpus_wer_not_official": round(100 * sum(s.errors for s in scores) / words, 3) if words else None,
    }


def sim_figure(values: list[float], rules: Profile) -> float:
    """The mean speaker similarity as the harness rounds it (official: 3 decimals; f5: 5)."""
    if not values:
        raise ValueError("no pair to average")
    return float(round(np.mean(np.array(values)), 3 if rules.name == "official" else 5))
