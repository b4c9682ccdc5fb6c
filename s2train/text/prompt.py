"""The ONE prompt builder: S2's chat format, for training sequences and generation prompts alike.

Shape legend: K codebooks, T positions. A prompt is an int64 tensor ``(1 + K, T)``: row 0 holds token
ids (text, special, or ``semantic_begin + c0``); rows 1..K hold the codes c0..c_{K-1} at semantic
positions and 0 elsewhere (README 2.a of the S2 fixtures).

The layout, as upstream's ``Conversation`` builds it (README 2.d, 2.g)::

    <|im_start|>system\\n convert the provided text to speech reference to the following:\\n\\nText:\\n
        <|speaker:0|>first reference text\\n<|speaker:1|>second reference text \\n\\nSpeech:\\n
        [frames of reference 0][frames of reference 1] <|im_end|>\\n
    <|im_start|>user\\n <|speaker:0|>text <|im_end|>\\n
    <|im_start|>assistant\\n<|voice|> [frames] <|im_end|>      a training sequence
    <|im_start|>assistant\\n<|voice|>                          a generation prompt: the model goes on here

- A reference text without a speaker tag gets ``<|speaker:i|>`` (i = its place in the list), the user
  text ``<|speaker:0|>``, as upstream's ``generate_long`` does. Reference texts are joined by ``\\n`` and
  their codes concatenated in the same order.
- Without a reference the system turn is upstream's ``convert the provided text to speech``
  (``system_turn=False``: no system turn at all, the plain form).
- A ``caption`` (how to speak: "A female speaker with a low-pitched voice speaks at a slow pace.") opens
  the system turn as a piece of its own, followed by ``\n\n`` and the rest of the turn; a caption always
  makes a system turn, even with ``system_turn=False``. Inline tags (``[pause]``, ``[whisper]``, ...)
  are plain text inside ``text``.
- Each piece of text is tokenized alone, as upstream's parts are, so a BPE merge never crosses a piece
  boundary (``"Hi." + "\\n\\nSpeech:\\n"`` is not ``"Hi.\\n\\nSpeech:\\n"`` for Qwen3's BPE).
- ``literal=True`` (text from a client): the texts are read as plain text, so ``<|im_end|>`` or
  ``<|speaker:3|>`` written in them cannot close a turn or pick a voice; the builder's own speaker tags
  still go in front (``speaker`` for the user text). For texts without tags the ids are the same.
- Trained positions (``Prompt.trained``) are what the model emits at inference: the assistant's frames
  and its closing ``<|im_end|>``. A training sequence ends with that ``<|im_end|>`` (no ``\\n``), and its
  first ``T - frames - 1`` positions equal the generation prompt for the same text and references, id for
  id: training and inference see the same prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from s2train.text.tokenizer import SPEAKER_TAG, TextTokenizer, speaker_token

IGNORE = -100  # label of a position that is not trained
REFERENCE_SYSTEM = "convert the provided text to speech reference to the following:\n\nText:\n"
SPEECH_HEADER = "\n\nSpeech:\n"
PLAIN_SYSTEM = "convert the provided text to speech"
CAPTION_BREAK = "\n\n"


@dataclass(frozen=True)
class Reference:
    """A voice to clone: its transcript and its codes ``(K, T)``."""

    text: str
    codes: Tensor


@dataclass(frozen=True)
class Prompt:
    tokens: Tensor  # (1 + K, T) int64
    trained: Tensor  # (T,) bool: the token at this position is a training target


def with_speaker(text: str, speaker: int = 0) -> str:
    """``text`` with ``<|speaker:speaker|>`` in front, unless it holds a speaker tag already."""
    return text if SPEAKER_TAG.search(text) else speaker_token(speaker) + text


class _Columns:
    """Accumulates prompt columns ``(1 + K, n)`` and their trained flags."""

    def __init__(self, tokenizer: TextTokenizer, num_codebooks: int):
        self.tokenizer, self.k = tokenizer, num_codebooks
        self.columns: list[Tensor] = []
        self.trained: list[Tensor] = []

    def _add(self, columns: Tensor, trained: bool) -> None:
        self.columns.append(columns)
        self.trained.append(torch.full((columns.shape[1],), trained))

    def ids(self, ids: list[int], trained: bool = False) -> None:
        columns = torch.zeros(1 + self.k, len(ids), dtype=torch.long)
        columns[0] = torch.tensor(ids, dtype=torch.long)
        self._add(columns, trained)

    def text(self, text: str, trained: bool = False, specials: bool = True) -> None:
        """``text`` as one piece; ``specials=False`` spells special token names in it out as plain text."""
        self.ids(self.tokenizer.encode(text, specials=specials), trained)

    def spoken(self, turns: list[tuple[int, str]]) -> None:
        """``<|speaker:i|>text`` for each ``(i, text)`` as one piece, the texts read as plain text: a
        tokenizer splits a piece at its special tokens before anything else, so for texts without tags
        these are the ids ``text(with_speaker(text, i))`` gives."""
        ids = []
        for i, text in turns:
            ids += [self.tokenizer.speaker_id(i), *self.tokenizer.encode(text, specials=False)]
        self.ids(ids)

    def frames(self, codes: Tensor, trained: bool = False) -> None:
        """Codes (K', T) of K' >= K codebooks: a model may speak the first K of its codec's (RVQ) codebooks."""
        codes = torch.as_tensor(codes, dtype=torch.long)  # (K', T)
        if codes.dim() != 2 or codes.shape[0] < self.k:
            raise ValueError(f"codes must be shaped (K >= {self.k}, T), not {tuple(codes.shape)}")
        codes = codes[: self.k]
        if codes.numel() and (codes.min() < 0 or codes[0].max() >= self.tokenizer.n_semantic):
            raise ValueError(
                f"codes out of range: c0 must lie in 0..{self.tokenizer.n_semantic - 1} (the tokenizer's "
                "semantic tokens) and no code may be negative; do the codec and the tokenizer match?"
            )
        self._add(torch.cat([codes[:1] + self.tokenizer.semantic_begin, codes]), trained)

    def finish(self) -> Prompt:
        return Prompt(torch.cat(self.columns, dim=1), torch.cat(self.trained))


def build_prompt(
    tokenizer: TextTokenizer,
    text: str,
    num_codebooks: int,
    *,
    codes: Tensor | None = None,
    references: Sequence[Reference] = (),
    system_turn: bool = True,
    literal: bool = False,
    speaker: int = 0,
    caption: str | None = None,
) -> Prompt:
    """The S2 chat prompt for ``text`` spoken in the voice of ``references`` (if any).

    With ``codes`` ``(K, T)`` (the utterance's own codes) it is a training sequence whose assistant turn
    holds those frames and ``<|im_end|>``; without, a generation prompt that ends after ``<|voice|>``.
    """
    out = _Columns(tokenizer, num_codebooks)

    def open_system() -> None:
        out.text("<|im_start|>system\n")
        if caption:
            out.text(caption, specials=not literal)
            out.text(CAPTION_BREAK)

    if references:
        open_system()
        out.text(REFERENCE_SYSTEM)
        if literal:
            last = len(references) - 1
            out.spoken([(i, r.text + ("\n" if i < last else "")) for i, r in enumerate(references)])
        else:
            out.text("\n".join(with_speaker(r.text, i) for i, r in enumerate(references)))
        out.text(SPEECH_HEADER)
        for reference in references:
            out.frames(reference.codes)
        out.text("<|im_end|>\n")
    elif system_turn or caption:
        open_system()
        out.text(PLAIN_SYSTEM)
        out.text("<|im_end|>\n")
    out.text("<|im_start|>user\n")
    if literal:
        out.spoken([(speaker, text)])
    else:
        out.text(with_speaker(text, speaker))
    out.text("<|im_end|>\n")
    out.text("<|im_start|>assistant\n<|voice|>")
    if codes is not None:
        out.frames(codes, trained=True)
        out.text("<|im_end|>", trained=True)
    return out.finish()


def inputs_and_labels(prompt: Prompt, tokenizer: TextTokenizer) -> tuple[Tensor, Tensor]:
    """``(inputs, labels)``, both ``(1 + K, T - 1)``: next-token targets of a prompt (README 2.a).

    ``inputs`` is ``tokens[:, :-1]``. Label row 0 at position t is the token at t + 1 where that token is
    trained, else -100. Label rows 1..K are the codes of the frame at t + 1 where that token is trained
    and semantic, else -100.

    Two differences from upstream's labels (``a.labels`` in the fixtures), neither of which changes a
    loss: where the next token is not semantic, rows 1..K are -100 here and 0 (CODEBOOK_PAD) upstream
    (the codebook loss only reads positions whose next token is semantic); and what is masked comes from
    ``prompt.trained``, not from a prompt length.
    """
    tokens, trained = prompt.tokens, prompt.trained[1:]  # trained: (T - 1,)
    nxt = tokens[:, 1:]
    labels = torch.full_like(nxt, IGNORE)
    labels[0] = torch.where(trained, nxt[0], IGNORE)
    semantic = trained & tokenizer.is_semantic(nxt[0])
    labels[1:] = torch.where(semantic, nxt[1:], IGNORE)
    return tokens[:, :-1], labels
