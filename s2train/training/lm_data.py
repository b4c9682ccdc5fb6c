"""Pretraining data: token shards -> packed Dual-AR training sequences, streamed with an exact resume.

Shape legend: B batch, K codebooks, T input positions (at most ``max_len``).

This lives in ``s2train/training`` beside ``codec_data.py``, not in ``data_pipeline/``: it runs inside the
trainer's DataLoader at every step and writes nothing, while ``data_pipeline`` is the sharded, resumable
production of files (clean and token shards).

**Sequences.** Every utterance becomes ``build_prompt(text, codes=its codes)`` (the one prompt builder
that inference calls too), then ``inputs_and_labels``: ``(1 + K, n)`` inputs and labels, so that each
utterance is shifted on its own and no label ever points into the next utterance. Consecutive
utterances of one speaker are packed into one sequence while their inputs fit ``max_len``. Inside a
sequence ``segment_ids`` say which utterance a position belongs to and ``positions`` restart at 0 with
every utterance: the model must attend only within a segment, because inference starts every utterance
fresh at position 0 with nothing before its prompt, so packing must not let one utterance see another.
An utterance whose inputs exceed ``max_len`` is dropped or cut to its first ``max_len`` positions
(``lm_data.overlong``) and counted.

**Examples.** Each utterance becomes one example of a kind drawn with the weights of ``lm_data.mix``
(seeded by the stream's seed, the epoch and the utterance's place, so a resumed run draws the same):

- ``plain``: the utterance's text and codes;
- ``cloning``: another utterance of the same speaker from the same shard, saying other words, is the
  reference in the system turn (its text and codes, as inference gives a reference clip); only the
  target is trained;
- ``captioned``: the captioner's caption of the target opens the system turn (with
  ``lm_data.rephrase_captions``, phrased anew from its measurements in a template drawn each time);
- ``tagged``: the target's text with the captioner's inline tags put back at their words (when the text
  is the ASR's, whose words the tags count);
- ``dialogue``: the target and an utterance of another speaker (of the same recording where the shard
  holds one) as one turn, ``<|speaker:0|>text<|speaker:1|>text``, their codes one after the other, with
  a reference of each speaker when the shard has another utterance of both.

A kind the utterance cannot make falls back to plain. Every kind goes through ``build_prompt``, so its
prompt is the one ``speech_request`` builds at inference for the same text, references and caption.

**Readers.** Each DataLoader worker of each rank is one reader (``world_size * num_workers`` in all).
When there are at least as many units (token shards, or blocks of rows of a saved dataset) as readers,
every epoch deals the shuffled units round-robin to the readers; otherwise every reader walks all units
and keeps every ``readers``-th utterance, so no reader (and no rank) is left empty. An epoch's order is a
function of ``(seed, epoch)`` alone: the unit order, and inside a unit the order of its speakers and of
each speaker's utterances. With ``loop=True`` (training) every reader runs epoch after epoch, so ranks
never run out at different steps (which would hang DDP); ``loop=False`` makes one pass.

**Resume.** Every sequence carries its reader's cursor (epoch, sequences yielded in that epoch, overlong
utterances so far) into the batch (``batch["stream"]``). The trainer hands each batch it consumes to
``TokenStream.advance`` (in ``training_step``, so a checkpoint written after step N has seen batch N)
and saves ``state_dict()``; a stream given that state with ``load_state_dict`` skips, in every reader,
the sequences already consumed, and starts the DataLoader's round-robin at the reader whose turn was
next. A resumed run therefore sees exactly the batches an uninterrupted run would have seen next, as
long as ``num_workers`` and the batch size are unchanged. Skipping re-reads and re-packs the skipped part
of the current epoch (token shards are small), it does not cost any model compute.

    stream = TokenStream(open_token_source("runs/demo/tokenize"), tokenizer, num_codebooks=10,
                         cfg=LMDataConfig(max_len=1024), seed=0, rank=rank, world_size=world_size)
    loader = DataLoader(stream, batch_size=8, num_workers=2, collate_fn=Collate(tokenizer.token_id("<|pad|>")))
"""

from __future__ import annotations

import fnmatch
import glob
import io
import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from s2train.checks import check
from s2train.judges.captioner import CAPTION_MEASURES, bin_word, load_bins, phrase_caption, tagged_text
from s2train.shards import read_tar
from s2train.text.prompt import IGNORE, Reference, build_prompt, inputs_and_labels
from s2train.text.tokenizer import TextTokenizer, speaker_token


@dataclass
class ExampleMix:
    """Mixing weights of the kinds of training example (``s2train.training.lm_data``, "Examples"); they
    need not sum to 1. An utterance drawn for a kind it cannot make (no other utterance of its speaker in
    its shard, no caption, tags that do not fit its text, no second speaker) becomes a plain example."""

    plain: float = 1.0
    cloning: float = 0.0
    captioned: float = 0.0
    tagged: float = 0.0
    dialogue: float = 0.0

    def __post_init__(self) -> None:
        weights = [self.plain, self.cloning, self.captioned, self.tagged, self.dialogue]
        check(
            all(w >= 0 for w in weights) and sum(weights) > 0,
            f"the example mix weights must be >= 0 and not all 0, not {weights}",
        )

    def probabilities(self) -> np.ndarray:
        weights = np.array([getattr(self, k) for k in KINDS], dtype=np.float64)
        return weights / weights.sum()


KINDS = ("plain", "cloning", "captioned", "tagged", "dialogue")


@dataclass
class LMDataConfig:
    """Token shards -> packed Dual-AR training sequences (``s2train.training.lm_data``)."""

    input: str | None = None  # a tokenize run dir, a folder or glob of token .tar, or a save_to_disk folder
    max_len: int = 2048  # input positions of one packed sequence
    overlong: str = "drop"  # an utterance longer than max_len: drop | cut (keep its first max_len positions)
    shuffle: bool = True  # a seeded new order every epoch
    loop: bool = True  # endless: every reader runs epoch after epoch (training); false: one pass
    hf_rows_per_unit: int = 1024  # a save_to_disk dataset is split into units of this many rows
    mix: ExampleMix = field(default_factory=ExampleMix)  # pretraining: plain, optionally cloning
    # Train on the first this many codebooks of the token data (0: all). The codec decodes from its first
    # K codebooks (residual quantizer), so a small model can leave the finest ones out.
    codebooks: int = 0
    # <|speaker:i|> of the target text of these speakers' one-speaker examples (by the records' speaker
    # name; the others get 0, references 0, 1, ... in order): fine-tuning may give its voice an id of its own
    speaker_ids: dict[str, int] = field(default_factory=dict)
    # the example mix of these speakers' utterances (by name) where it is not ``mix``: fine-tuning trains
    # its voice on its own mix and the replayed corpus on another
    speaker_mix: dict[str, ExampleMix] = field(default_factory=dict)
    # utterances cut from these recordings (their ``source``, globs) are never trained on: a held-out set
    exclude_sources: list[str] = field(default_factory=list)
    # Caption bins (as judges.captioner.bins) to phrase each captioned example's caption in anew, from the
    # captioner's measurements the token data keeps, in a template drawn each time; None: the caption as
    # clean wrote it. One template per utterance lets a small model tell recordings of the same words
    # apart by the caption's wording and never read what it says (its pace, say).
    rephrase_captions: str | None = None
    # the example mix of utterances whose measured speaking rate those bins call this word (slow, fast)
    # where it is not ``mix`` (``speaker_mix`` comes first): a corpus has few recordings at a marked pace,
    # and only a captioned one says what its pace word means, so those can be captioned more often
    pace_mix: dict[str, ExampleMix] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check(self.max_len >= 8, "lm_data.max_len must be at least 8")
        check(
            not self.pace_mix or self.rephrase_captions is not None,
            "lm_data.pace_mix bins the measured speaking rate with the caption bins of "
            "lm_data.rephrase_captions: set it too",
        )
        check(
            all(i >= 0 for i in self.speaker_ids.values()),
            f"lm_data.speaker_ids cannot be negative: {self.speaker_ids}",
        )
        check(
            self.overlong in ("drop", "cut"), f"lm_data.overlong must be drop or cut, not {self.overlong!r}"
        )
        check(self.hf_rows_per_unit >= 1, "lm_data.hf_rows_per_unit must be at least 1")
        check(
            self.codebooks == 0 or self.codebooks >= 2,
            f"lm_data.codebooks must be 0 (all) or at least 2, not {self.codebooks}",
        )


log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class TokenUtterance:
    key: str
    speaker: str
    text: str
    codes: np.ndarray  # (K, T) integer codes
    caption: str | None = None  # the captioner's, when the token data holds one
    tags: tuple = ()  # the captioner's inline tags ({tag, word_index, ...})
    asr_text: str | None = None  # the words the tags' word_index counts
    source: str | None = None  # the recording it was cut from
    lang: str | None = None  # the language clean detected or the metadata gave
    measures: tuple = ()  # the captioner's measurements ((name, value), ...) a caption is phrased from


def _utterance(key: str, meta: dict, codes: np.ndarray) -> TokenUtterance:
    return TokenUtterance(
        key,
        str(meta.get("speaker") or key),
        meta["text"],
        codes,
        caption=meta.get("caption") or None,
        tags=tuple(meta.get("tags") or ()),
        asr_text=meta.get("asr_text"),
        source=meta.get("source"),
        lang=meta.get("lang"),
        measures=tuple((k, meta[k]) for k in CAPTION_MEASURES if meta.get(k) is not None),
    )


class TokenSource(ABC):
    """Token data cut into units (the grain at which readers share it out)."""

    @property
    @abstractmethod
    def n_units(self) -> int: ...

    @abstractmethod
    def read_unit(self, unit: int) -> list[TokenUtterance]:
        """The utterances of one unit, in a fixed order."""


class TarShards(TokenSource):
    """Webdataset token shards (``{key}.codes.npy`` + ``{key}.json``, see ``data_pipeline.tokenize``);
    one tar is one unit."""

    def __init__(self, paths: list[Path]):
        if not paths:
            raise ValueError("no token shards given")
        self.paths = [Path(p) for p in paths]

    @property
    def n_units(self) -> int:
        return len(self.paths)

    def read_unit(self, unit: int) -> list[TokenUtterance]:
        utterances = []
        for key, members in read_tar(self.paths[unit]).items():
            if "codes.npy" not in members or "json" not in members:
                raise ValueError(f"{self.paths[unit]}: sample {key} lacks its .codes.npy or .json")
            meta = json.loads(members["json"])
            codes = np.load(io.BytesIO(members["codes.npy"]), allow_pickle=False)
            utterances.append(_utterance(key, meta, codes))
        return utterances


class SavedDataset(TokenSource):
    """A Hugging Face ``datasets`` folder written by ``save_to_disk`` with a ``codes`` column (K lists of T
    ints) and ``text``, optionally ``speaker``, ``id``, ``caption``, ``tags``, ``asr_text`` and ``source``;
    units are blocks of ``rows_per_unit`` rows."""

    def __init__(self, path: str | Path, rows_per_unit: int):
        self.path, self.rows_per_unit = str(path), rows_per_unit
        self._dataset = None
        columns = set(self.dataset.column_names)
        if not {"codes", "text"} <= columns:
            raise ValueError(f"{path} needs the columns codes and text; it has {sorted(columns)}")

    @property
    def dataset(self):
        if self._dataset is None:  # opened lazily, so a pickled copy in a worker reopens it
            from datasets import load_from_disk

            self._dataset = load_from_disk(self.path)
        return self._dataset

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_dataset": None}

    @property
    def n_units(self) -> int:
        return -(-len(self.dataset) // self.rows_per_unit)

    def read_unit(self, unit: int) -> list[TokenUtterance]:
        first = unit * self.rows_per_unit
        rows = self.dataset[first : min(first + self.rows_per_unit, len(self.dataset))]
        utterances = []
        optional = [c for c in ("speaker", "caption", "tags", "asr_text", "source") if c in rows]
        for i, codes in enumerate(rows["codes"]):
            key = str(rows["id"][i]) if "id" in rows else f"row{first + i}"
            meta = {"text": rows["text"][i], **{c: rows[c][i] for c in optional}}
            utterances.append(_utterance(key, meta, np.asarray(codes)))
        return utterances


def open_token_source(spec: str | Path, rows_per_unit: int = 1024) -> TokenSource:
    """Token data from a tokenize run directory (its ``shards/``), a folder of ``.tar``, a glob, one
    ``.tar``, or a ``save_to_disk`` folder."""
    path = Path(spec)
    if any(c in str(spec) for c in "*?["):
        return TarShards(sorted(Path(p) for p in glob.glob(str(spec))))
    if path.is_file() and path.suffix == ".tar":
        return TarShards([path])
    if path.is_dir():
        for folder in (path / "shards", path):
            if tars := sorted(folder.glob("*.tar")):
                return TarShards(tars)
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return SavedDataset(path, rows_per_unit)
    raise ValueError(
        f"no token data at {spec}: expected a tokenize run directory, a folder or glob of token .tar "
        "shards, or a datasets.save_to_disk folder"
    )


# ------------------------------------------------------------------------------------------- packing


@dataclass
class Example:
    """What one training example asks of the model: the inputs an inference request would give (text,
    references, caption) and the codes it must answer with."""

    kind: str
    key: str
    speaker: str
    text: str
    codes: np.ndarray  # (K, T): the assistant turn's frames
    references: list[Reference] = field(default_factory=list)
    caption: str | None = None


@dataclass
class Segment:
    """One utterance, shifted: ``inputs`` and ``labels`` ``(1 + K, n)``."""

    key: str
    speaker: str
    inputs: Tensor
    labels: Tensor
    kind: str = "plain"


@dataclass
class PackedSequence:
    inputs: Tensor  # (1 + K, T) int64
    labels: Tensor  # (1 + K, T) int64
    positions: Tensor  # (T,) int64, 0 at the start of every segment
    segment_ids: Tensor  # (T,) int64, 0, 1, ... one per packed utterance
    keys: list[str]
    cursor: tuple[int, int, int, int, int]  # reader, readers on this rank, epoch, yielded, overlong
    kinds: list[str] = field(default_factory=list)  # the example kind of each segment


def pack_segments(segments: list[Segment]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(inputs, labels, positions, segment_ids)`` of segments laid end to end."""
    lengths = [s.inputs.shape[1] for s in segments]
    return (
        torch.cat([s.inputs for s in segments], dim=1),
        torch.cat([s.labels for s in segments], dim=1),
        torch.cat([torch.arange(n) for n in lengths]),
        torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]),
    )


class _Packer:
    """Greedy packing of one speaker's consecutive utterances up to ``max_len`` input positions."""

    def __init__(self, max_len: int, overlong: str):
        self.max_len, self.overlong = max_len, overlong
        self.pending: list[Segment] = []
        self.length = 0
        self.overlong_count = 0

    def add(self, segment: Segment) -> list[Segment] | None:
        """Take one segment; return a full group when this one does not join it."""
        n = segment.inputs.shape[1]
        if n > self.max_len:
            self.overlong_count += 1
            if self.overlong == "drop":
                return None
            segment = Segment(
                segment.key,
                segment.speaker,
                segment.inputs[:, : self.max_len],
                segment.labels[:, : self.max_len],
                segment.kind,
            )
            n = self.max_len
        full = None
        if self.pending and (segment.speaker != self.pending[0].speaker or self.length + n > self.max_len):
            full = self.flush()
        self.pending.append(segment)
        self.length += n
        return full

    def flush(self) -> list[Segment] | None:
        full, self.pending, self.length = self.pending or None, [], 0
        return full


# ------------------------------------------------------------------------------------------ examples


def _words(text: str) -> list[str]:
    """The words of ``text`` as the ASR writes them (lower case, no punctuation), one per space-split
    token; a token without letters or digits counts as an empty word, so it cannot shift the indices."""
    return [re.sub(r"[^\w']", "", token.lower()) for token in text.split()]


def _other(run: list[TokenUtterance], but: TokenUtterance, rng: np.random.Generator) -> TokenUtterance | None:
    """Another utterance of ``run`` to be ``but``'s reference voice, never one saying the same words (the
    same sentence at another pace): at inference the reference says something else, so copying it must
    not be what the model learns."""
    others = [x for x in run if x.key != but.key and x.text != but.text]
    return others[int(rng.integers(len(others)))] if others else None


def _build_example(
    kind: str,
    u: TokenUtterance,
    groups: dict[str, list[TokenUtterance]],
    rng: np.random.Generator,
    caption_bins: dict | None = None,
) -> Example | None:
    """One example of ``kind`` around the target ``u``, or None where ``u`` cannot make it; with
    ``caption_bins`` a captioned example's caption is phrased anew from ``u``'s measurements."""
    if kind == "cloning":  # another utterance of the speaker is the voice to clone, as at inference
        ref = _other(groups[u.speaker], u, rng)
        if ref is None:
            return None
        return Example(
            kind,
            u.key,
            u.speaker,
            u.text,
            u.codes,
            [Reference(ref.text, torch.from_numpy(ref.codes.astype(np.int64)))],
        )
    if kind == "captioned":
        if not u.caption:
            return None
        caption = u.caption
        if caption_bins is not None and u.measures:
            caption = phrase_caption(caption_bins, dict(u.measures), int(rng.integers(1 << 30)))
        return Example(kind, u.key, u.speaker, u.text, u.codes, caption=caption)
    if kind == "tagged":  # word_index counts the ASR's words: the tags fit a text with the same words
        placed = [t for t in u.tags if t.get("word_index") is not None]
        if not placed or u.asr_text is None or _words(u.text) != _words(u.asr_text):
            return None
        return Example(kind, u.key, u.speaker, tagged_text(u.text.split(), placed), u.codes)
    if kind == "dialogue":  # the next voice: of the same recording where there is one, else of the shard
        partners = [x for speaker, run in groups.items() if speaker != u.speaker for x in run]
        same = [x for x in partners if x.source and x.source == u.source]
        pool = same or partners
        if not pool:
            return None
        b = pool[int(rng.integers(len(pool)))]
        text = f"{speaker_token(0)}{u.text}{speaker_token(1)}{b.text}"
        codes = np.concatenate([u.codes, b.codes], axis=1)
        voices = [_other(groups[u.speaker], u, rng), _other(groups[b.speaker], b, rng)]
        references = [
            Reference(v.text, torch.from_numpy(v.codes.astype(np.int64))) for v in voices if v is not None
        ]
        return Example(
            kind, f"{u.key}+{b.key}", u.speaker, text, codes, references if len(references) == 2 else []
        )
    raise ValueError(f"unknown example kind {kind!r}; the kinds are {', '.join(KINDS)}")


# -------------------------------------------------------------------------------------------- stream


class TokenStream(IterableDataset):
    """Packed training sequences from token data, split over ranks and DataLoader workers (module doc).

    ``num_codebooks`` is K of the codes (checked on every utterance); ``system_turn`` is
    ``TextConfig.system_turn``, which the inference engine passes to ``build_prompt`` too.
    """

    def __init__(
        self,
        source: TokenSource,
        tokenizer: TextTokenizer,
        num_codebooks: int,
        cfg: LMDataConfig,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        system_turn: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.source, self.tokenizer, self.num_codebooks, self.cfg = source, tokenizer, num_codebooks, cfg
        self.seed, self.rank, self.world_size, self.system_turn = seed, rank, world_size, system_turn
        self.epoch = 0  # where readers without a cursor start
        self.readers: dict[int, tuple[int, int, int]] = {}  # reader -> consumed (epoch, yielded, overlong)
        self.next_reader = 0  # the reader whose batch the trainer takes next
        self.num_workers: int | None = None  # DataLoader workers per rank, once a batch was consumed
        self.caption_bins = load_bins(cfg.rephrase_captions) if cfg.rephrase_captions else None

    # ----------------------------------------------------------------------------------- position

    def set_epoch(self, epoch: int) -> None:
        """``loop=False``: make the next pass epoch ``epoch``, every reader from its beginning. The epoch the
        stream is already in (a resumed one, say) is left as it is."""
        if epoch != self.epoch:
            self.epoch, self.readers, self.next_reader = epoch, {}, 0

    def advance(self, stream: Tensor) -> None:
        """Record that the trainer consumed a batch: ``batch["stream"]`` ``(B, 5)``."""
        for reader, readers, epoch, yielded, overlong in stream.tolist():
            self.readers[reader] = (epoch, yielded, overlong)
            self.num_workers, self.next_reader = readers, (reader + 1) % readers

    @property
    def overlong_count(self) -> int:
        """Utterances dropped or cut so far in the current epoch of each reader, summed over readers."""
        return sum(overlong for _, _, overlong in self.readers.values())

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "readers": {str(r): list(c) for r, c in self.readers.items()},
            "next_reader": self.next_reader,
            "num_workers": self.num_workers,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.next_reader = int(state["epoch"]), int(state["next_reader"])
        self.readers = {int(r): tuple(c) for r, c in state["readers"].items()}
        self.num_workers = state["num_workers"]

    # ---------------------------------------------------------------------------------- iteration

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.num_workers is not None and self.num_workers != workers:
            raise ValueError(
                f"this stream was saved with {self.num_workers} DataLoader workers per rank; resume it with "
                f"the same number, not {workers}, to see the same data order"
            )
        return (worker + self.next_reader) % workers, workers

    def _unit_order(self, epoch: int) -> np.ndarray:
        units = np.arange(self.source.n_units)
        return np.random.default_rng([self.seed, epoch]).permutation(units) if self.cfg.shuffle else units

    def _speaker_runs(self, utterances: list[TokenUtterance], epoch: int, unit: int) -> list[TokenUtterance]:
        """A unit's utterances grouped by speaker; groups and their members shuffled per epoch."""
        groups: dict[str, list[TokenUtterance]] = {}
        for u in utterances:
            groups.setdefault(u.speaker, []).append(u)
        runs = list(groups.values())
        if self.cfg.shuffle:
            rng = np.random.default_rng([self.seed, epoch, int(unit)])
            runs = [[run[i] for i in rng.permutation(len(run))] for run in runs]
            runs = [runs[i] for i in rng.permutation(len(runs))]
        return [u for run in runs for u in run]

    def _kept(self, utterances: list[TokenUtterance]) -> list[TokenUtterance]:
        """``utterances`` less those of the recordings ``lm_data.exclude_sources`` holds out."""
        patterns = self.cfg.exclude_sources
        if not patterns:
            return utterances
        return [u for u in utterances if not any(fnmatch.fnmatchcase(u.source or "", p) for p in patterns)]

    def _utterances(
        self, epoch: int, reader: int, readers: int
    ) -> Iterator[tuple[TokenUtterance, dict, int]]:
        """This reader's share of one epoch, in order: ``(utterance, its unit's utterances by speaker,
        a seed of its own)``."""
        order = self._unit_order(epoch)
        by_unit = len(order) >= readers
        index = 0
        for unit in order[reader::readers] if by_unit else order:
            ordered = self._speaker_runs(self._kept(self.source.read_unit(int(unit))), epoch, unit)
            groups: dict[str, list[TokenUtterance]] = {}
            for u in ordered:
                groups.setdefault(u.speaker, []).append(u)
            for position, utterance in enumerate(ordered):
                if by_unit or index % readers == reader:
                    yield utterance, groups, (epoch, int(unit), position)
                index += 1

    def example(
        self, u: TokenUtterance, groups: dict[str, list[TokenUtterance]], where: tuple[int, ...]
    ) -> Example:
        """The example ``u`` makes at ``where`` (epoch, unit, position): a kind drawn by ``lm_data.mix``
        from a generator seeded by the stream's seed and ``where``, so a resumed epoch draws the same;
        plain where the drawn kind needs what ``u`` lacks."""
        rng = np.random.default_rng([self.seed, *where])
        mix = self.cfg.speaker_mix.get(u.speaker) or self._pace_mix(u) or self.cfg.mix
        kind = KINDS[int(rng.choice(len(KINDS), p=mix.probabilities()))]
        made = _build_example(kind, u, groups, rng, self.caption_bins) if kind != "plain" else None
        return made or Example("plain", u.key, u.speaker, u.text, u.codes)

    def _pace_mix(self, u: TokenUtterance) -> ExampleMix | None:
        """``lm_data.pace_mix`` of the word the caption bins give ``u``'s measured speaking rate, if any."""
        if not self.cfg.pace_mix:  # set, it comes with rephrase_captions' bins (LMDataConfig checks)
            return None
        rate = dict(u.measures).get("speaking_rate")
        return self.cfg.pace_mix.get(bin_word(rate, self.caption_bins["speaking_rate"])) if rate else None

    def _segment(self, example: Example) -> Segment:
        codes = torch.from_numpy(example.codes.astype(np.int64))
        try:
            prompt = build_prompt(
                self.tokenizer,
                example.text,
                self.num_codebooks,
                codes=codes,
                references=example.references,
                caption=example.caption,
                speaker=self.cfg.speaker_ids.get(example.speaker, 0),  # a dialogue's text has its own tags
                system_turn=self.system_turn,
            )
        except ValueError as error:
            raise ValueError(f"utterance {example.key}: {error}") from error
        inputs, labels = inputs_and_labels(prompt, self.tokenizer)
        return Segment(example.key, example.speaker, inputs, labels, example.kind)

    def _epoch(self, epoch: int, reader: int, readers: int) -> Iterator[tuple[list[Segment], int]]:
        """``(segments of one packed sequence, overlong utterances so far)`` for one epoch of a reader."""
        packer = _Packer(self.cfg.max_len, self.cfg.overlong)
        for utterance, groups, where in self._utterances(epoch, reader, readers):
            if full := packer.add(self._segment(self.example(utterance, groups, where))):
                yield full, packer.overlong_count
        if full := packer.flush():
            yield full, packer.overlong_count
        if packer.overlong_count:
            log.warning(
                "reader %d, epoch %d: %s %d utterances longer than lm_data.max_len=%d",
                reader,
                epoch,
                "dropped" if self.cfg.overlong == "drop" else "cut",
                packer.overlong_count,
                self.cfg.max_len,
            )

    def __iter__(self) -> Iterator[PackedSequence]:
        local, workers = self._worker()
        reader, readers = self.rank * workers + local, self.world_size * workers
        epoch, skip, _ = self.readers.get(local, (self.epoch, 0, 0))
        while True:
            yielded = 0
            for segments, overlong in self._epoch(epoch, reader, readers):
                yielded += 1
                if yielded <= skip:
                    continue
                inputs, labels, positions, segment_ids = pack_segments(segments)
                keys = [s.key for s in segments]
                yield PackedSequence(
                    inputs,
                    labels,
                    positions,
                    segment_ids,
                    keys,
                    (local, workers, epoch, yielded, overlong),
                    [s.kind for s in segments],
                )
            if not self.cfg.loop:
                return
            if yielded == 0:
                raise ValueError(
                    f"reader {reader} of {readers} got no sequence in epoch {epoch}: every utterance of its "
                    "share is longer than lm_data.max_len (with overlong=drop), or there is no data"
                )
            epoch, skip = epoch + 1, 0


# ------------------------------------------------------------------------------------------- batches


class Collate:
    """Packed sequences -> the training batch, right-padded to the longest (or to ``pad_to``).

    ``inputs`` / ``labels`` (B, 1 + K, T) int64, ``positions`` / ``segment_ids`` (B, T) int64,
    ``stream`` (B, 5) int64 (cursors for ``TokenStream.advance``), ``keys`` (B lists of utterance keys).
    Padding is one more segment of its own (id = the sequence's segment count, positions from 0), so it
    never attends to real tokens; its inputs are ``pad_id`` in row 0 and 0 in rows 1..K, labels -100.
    """

    def __init__(self, pad_id: int, pad_to: int | None = None):
        self.pad_id, self.pad_to = pad_id, pad_to

    def __call__(self, sequences: list[PackedSequence]) -> dict:
        longest = max(s.inputs.shape[1] for s in sequences)
        length = self.pad_to or longest
        if length < longest:
            raise ValueError(f"a sequence of {longest} positions does not fit pad_to={self.pad_to}")
        rows = sequences[0].inputs.shape[0]
        inputs = torch.zeros(len(sequences), rows, length, dtype=torch.long)
        inputs[:, 0] = self.pad_id
        labels = torch.full((len(sequences), rows, length), IGNORE, dtype=torch.long)
        positions = torch.zeros(len(sequences), length, dtype=torch.long)
        segment_ids = torch.zeros(len(sequences), length, dtype=torch.long)
        for b, s in enumerate(sequences):
            n = s.inputs.shape[1]
            inputs[b, :, :n], labels[b, :, :n] = s.inputs, s.labels
            positions[b, :n], segment_ids[b, :n] = s.positions, s.segment_ids
            positions[b, n:] = torch.arange(length - n)
            segment_ids[b, n:] = int(s.segment_ids[-1]) + 1
        return {
            "inputs": inputs,
            "labels": labels,
            "positions": positions,
            "segment_ids": segment_ids,
            "stream": torch.tensor([s.cursor for s in sequences], dtype=torch.long),
            "keys": [s.keys for s in sequences],
            "kinds": [s.kinds for s in sequences],
        }
