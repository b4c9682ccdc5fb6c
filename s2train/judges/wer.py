"""Word error rate with a light normaliser, for checks on English transcripts.

The benchmark harnesses bring their own, officially specified normalisers (``eval/seedtts.py``); this
one is for the framework's own measurements, such as the codec stage's held-out WER and the clean
stage's tests (lowercase, punctuation dropped, whitespace collapsed).
"""

from __future__ import annotations

import re

import jiwer


def normalize(text: str) -> str:
    text = re.sub(r"[^\w\s']", " ", text.lower())
    return " ".join(text.split())


def wer(references: list[str], hypotheses: list[str]) -> float:
    """Corpus-level WER (errors over all reference words) after ``normalize``; 0..inf, not clipped."""
    refs = [normalize(r) for r in references]
    hyps = [normalize(h) for h in hypotheses]
    pairs = [(r, h) for r, h in zip(refs, hyps) if r]
    if not pairs:
        raise ValueError("no non-empty reference to score")
    return float(jiwer.wer([r for r, _ in pairs], [h for _, h in pairs]))
