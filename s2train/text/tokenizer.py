"""Text tokenizers: the text ids, the Fish special tokens and the block of semantic tokens.

Every tokenizer has the S2 layout: text ids, then the special tokens, then ``<|speaker:i|>``, then a
contiguous block ``<|semantic:0|>`` .. ``<|semantic:n-1|>``, so that a semantic id is
``semantic_begin + code``. Two kinds:

- ``HFTokenizer``: a local Hugging Face ``tokenizer.json`` (the released S2 Pro's Qwen3 BPE in real
  use). As upstream does, ``semantic_begin`` / ``semantic_end`` come from the ``<|semantic:i|>`` tokens
  the vocabulary actually holds, never from a model config.
- ``ByteTokenizer``: UTF-8 bytes (ids 0..255), then the specials; any language, nothing to download.
  With the same sizes its ids equal the tiny S2 Pro fixture tokenizer's, id for id.

Both find special tokens written inside text (``"<|speaker:0|>Hi."`` encodes the speaker tag as one id),
as Hugging Face tokenizers do with added tokens; ``encode(text, specials=False)`` reads such names as
plain text instead, for text from someone who must not steer the prompt (a server's client).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from s2train.checks import check


@dataclass
class TextConfig:
    """The text tokenizer (``s2train.text.tokenizer``) and the prompt format that training and inference
    share: ``byte`` (UTF-8 bytes, then the specials; nothing to download, the demo) or ``hf`` (a local
    Hugging Face ``tokenizer.json``, e.g. the released S2 Pro's Qwen3 tokenizer)."""

    kind: str = "byte"  # byte | hf
    path: str | None = None  # hf: a folder with tokenizer.json, or the file
    n_speakers: int = 4  # <|speaker:0|>..<|speaker:n-1|>: byte makes them, hf must hold at least these
    n_semantic: int = 64  # semantic tokens = the codec's semantic codebook size (tiny 64, s2pro 4096)
    system_turn: bool = True  # prompts without a reference open with upstream's system turn; false: none

    def __post_init__(self) -> None:
        check(self.kind in ("byte", "hf"), f"text.kind must be byte or hf, not {self.kind!r}")
        check(self.kind != "hf" or bool(self.path), "text.kind=hf needs text.path (a tokenizer.json folder)")
        check(self.n_speakers >= 1, "text.n_speakers must be at least 1")
        check(self.n_semantic >= 1, "text.n_semantic must be at least 1")


# The named special tokens, in the order of their ids (after the 256 bytes in ByteTokenizer).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|pad|>",
    "<|phoneme_start|>",
    "<|phoneme_end|>",
    "<|text|>",
    "<|voice|>",
    "<|interleave|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|audio_pad|>",
)
# The specials the prompt builder and the batches need from any tokenizer.
REQUIRED_TOKENS = ("<|im_start|>", "<|im_end|>", "<|pad|>", "<|voice|>", "<|speaker:0|>")
SPEAKER_TAG = re.compile(r"<\|speaker:(\d+)\|>")
SEMANTIC_TAG = re.compile(r"<\|semantic:(\d+)\|>")
_ANY_TAG = re.compile(r"<\|[^<>|]+\|>")


def speaker_token(i: int) -> str:
    return f"<|speaker:{i}|>"


def semantic_token(code: int) -> str:
    return f"<|semantic:{code}|>"


class TextTokenizer(ABC):
    """What the prompt builder, the data and the inference engine need from a tokenizer.

    Subclasses set ``semantic_begin`` and ``semantic_end`` (the ids of ``<|semantic:0|>`` and of the
    last semantic token, inclusive) and ``n_speakers`` (``<|speaker:0|>`` .. ``<|speaker:n-1|>`` exist).
    """

    semantic_begin: int
    semantic_end: int
    n_speakers: int

    @abstractmethod
    def encode(self, text: str, specials: bool = True) -> list[int]:
        """Ids of ``text``, with special tokens written in it recognised (``specials=False``: spelled out
        as the plain text they are); no BOS/EOS is added."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens written out by name."""

    @abstractmethod
    def token_id(self, name: str) -> int:
        """The id of a special token such as ``<|im_end|>``; ``KeyError`` naming it when absent."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Ids run from 0 to ``vocab_size - 1`` (a model's embedding table may be padded beyond)."""

    @property
    def n_semantic(self) -> int:
        return self.semantic_end - self.semantic_begin + 1

    def speaker_id(self, i: int) -> int:
        return self.token_id(speaker_token(i))

    def is_semantic(self, ids: Tensor) -> Tensor:
        """Elementwise: is the id a semantic token (``semantic_begin <= id <= semantic_end``)."""
        return (ids >= self.semantic_begin) & (ids <= self.semantic_end)

    def _check_required(self) -> None:
        missing = []
        for name in REQUIRED_TOKENS:
            try:
                self.token_id(name)
            except KeyError:
                missing.append(name)
        if missing:
            raise ValueError(f"the tokenizer lacks the special tokens {missing} that S2 prompts need")


def byte_level_alphabet() -> dict[int, str]:
    """Byte -> the printable character byte-level BPE vocabularies (GPT-2's, Qwen's) write it as: printable
    Latin-1 bytes stand for themselves, the others for ``chr(256 + n)`` in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    out, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            out[byte] = chr(byte)
        else:
            out[byte] = chr(256 + extra)
            extra += 1
    return out


class ByteTokenizer(TextTokenizer):
    """Ids 0..255 are the UTF-8 bytes, then ``SPECIAL_TOKENS``, then ``n_speakers`` speaker tokens,
    then ``n_semantic`` semantic tokens. ``ByteTokenizer(4, 64)`` is the tiny fixture's layout."""

    def __init__(self, n_speakers: int, n_semantic: int):
        if n_speakers < 1 or n_semantic < 1:
            raise ValueError("ByteTokenizer needs at least one speaker token and one semantic token")
        names = [
            *SPECIAL_TOKENS,
            *(speaker_token(i) for i in range(n_speakers)),
            *(semantic_token(c) for c in range(n_semantic)),
        ]
        self._names = names
        self._ids = {name: 256 + i for i, name in enumerate(names)}
        self.n_speakers = n_speakers
        self.semantic_begin = self._ids[semantic_token(0)]
        self.semantic_end = self.semantic_begin + n_semantic - 1

    @property
    def vocab_size(self) -> int:
        return 256 + len(self._names)

    def token_id(self, name: str) -> int:
        if name not in self._ids:
            raise KeyError(f"{name} is not a special token of this ByteTokenizer")
        return self._ids[name]

    def encode(self, text: str, specials: bool = True) -> list[int]:
        if not specials:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        start = 0
        for match in _ANY_TAG.finditer(text):
            if match.group() in self._ids:
                ids += text[start : match.start()].encode("utf-8")
                ids.append(self._ids[match.group()])
                start = match.end()
        ids += text[start:].encode("utf-8")
        return ids

    def save_hf(self, folder: str | Path) -> None:
        """This tokenizer as a Hugging Face ``tokenizer.json`` (byte-level BPE without merges, the specials
        as added tokens; ``tokenizer_config.json`` and ``special_tokens_map.json`` beside it), which
        encodes every text to the same ids: what a released-layout folder needs (``s2train.compat``)."""
        import json

        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        vocab = {char: byte for byte, char in byte_level_alphabet().items()}
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in self._names])
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(folder / "tokenizer.json"))
        specials = {"eos_token": "<|im_end|>", "pad_token": "<|pad|>"}
        (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=1))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            **specials,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))

    def decode(self, ids: Sequence[int]) -> str:
        pieces, pending = [], bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"id {i} is outside this ByteTokenizer's 0..{self.vocab_size - 1}")
            if i < 256:
                pending.append(i)
                continue
            pieces.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            pieces.append(self._names[i - 256])
        pieces.append(pending.decode("utf-8", errors="replace"))
        return "".join(pieces)


class HFTokenizer(TextTokenizer):
    """A local Hugging Face tokenizer: a folder holding ``tokenizer.json``, or that file itself."""

    FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        file = Path(path)
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.is_file():
            raise ValueError(f"no Hugging Face tokenizer.json at {path}")
        self.folder = file.parent  # where its tokenizer_config.json and special_tokens_map.json lie, if any
        self._tokenizer = Tokenizer.from_file(str(file))
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        semantic = {int(m.group(1)): i for name, i in vocab.items() if (m := SEMANTIC_TAG.fullmatch(name))}
        if not semantic:
            raise ValueError(f"{file} has no <|semantic:i|> tokens: it is not an S2 tokenizer")
        self.semantic_begin, self.semantic_end = min(semantic.values()), max(semantic.values())
        if sorted(semantic) != list(range(len(semantic))) or any(
            i != self.semantic_begin + code for code, i in semantic.items()
        ):
            raise ValueError(
                f"{file}: the <|semantic:i|> tokens must be <|semantic:0|>.. in one block of consecutive "
                "ids, so that a token id is semantic_begin + code"
            )
        speakers = {int(m.group(1)) for name in vocab if (m := SPEAKER_TAG.fullmatch(name))}
        self.n_speakers = next(i for i in range(len(speakers) + 1) if i not in speakers)
        self._check_required()

    def copy_to(self, folder: str | Path) -> None:
        """Its files (``tokenizer.json`` and, where present, its config and special-token map) into
        ``folder``, written atomically; nothing to do where they already lie there."""
        from s2train.runs import atomic_path

        folder = Path(folder)
        if folder.resolve() == self.folder.resolve():
            return
        folder.mkdir(parents=True, exist_ok=True)
        for name in self.FILES:
            if (self.folder / name).is_file():
                with atomic_path(folder / name) as tmp:
                    tmp.write_bytes((self.folder / name).read_bytes())

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, name: str) -> int:
        i = self._tokenizer.token_to_id(name)
        if i is None:
            raise KeyError(f"{name} is not in this tokenizer's vocabulary")
        return i

    def encode(self, text: str, specials: bool = True) -> list[int]:
        if specials:
            return self._tokenizer.encode(text, add_special_tokens=False).ids
        # encode_special_tokens: added tokens in the text go through the BPE like any other text
        self._tokenizer.encode_special_tokens = True
        try:
            ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        finally:
            self._tokenizer.encode_special_tokens = False
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def model_tokenizer(release: str | Path | None, cfg: TextConfig) -> TextTokenizer:
    """The tokenizer of a model: a released S2 Pro folder's own ``tokenizer.json`` (``release``, as
    ``open_dual_ar`` returns it) unless ``text.kind=hf`` names another, else ``cfg``'s."""
    return HFTokenizer(release) if release is not None and cfg.kind != "hf" else load_tokenizer(cfg)


def load_tokenizer(cfg: TextConfig) -> TextTokenizer:
    """The tokenizer ``cfg`` names; a Hugging Face one must hold ``cfg.n_semantic`` semantic tokens (the
    codec's semantic codebook size) and at least ``cfg.n_speakers`` speaker tokens."""
    if cfg.kind == "byte":
        return ByteTokenizer(cfg.n_speakers, cfg.n_semantic)
    tokenizer = HFTokenizer(cfg.path)
    if tokenizer.n_semantic != cfg.n_semantic:
        raise ValueError(
            f"{cfg.path} has {tokenizer.n_semantic} semantic tokens but text.n_semantic={cfg.n_semantic}; "
            "set text.n_semantic to the codec's semantic codebook size and use a tokenizer that matches it"
        )
    if tokenizer.n_speakers < cfg.n_speakers:
        raise ValueError(
            f"{cfg.path} has {tokenizer.n_speakers} <|speaker:i|> tokens, fewer than "
            f"text.n_speakers={cfg.n_speakers}"
        )
    return tokenizer
