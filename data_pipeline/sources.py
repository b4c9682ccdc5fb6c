"""Inputs of the clean stage, listed in a stable order: a folder of audio files, a Hugging Face
``datasets`` dataset saved on disk, or webdataset tars.

Each item knows how to open its audio (``AudioReader``) and what the source says about it (language,
speaker, transcript), without decoding anything while the list is built.

- folder: every file under ``data.path`` whose extension is in ``data.extensions``; an optional
  ``metadata.jsonl`` (Hugging Face audiofolder style: ``file_name`` plus ``lang``/``language``,
  ``speaker``, ``text``) adds what the folder knows, and a ``.txt`` or ``.lab`` file beside a recording
  (``a.wav`` + ``a.txt``) is its transcript where the metadata gives none.
- hf: ``datasets.load_from_disk(data.path)`` (a Dataset or every split of a DatasetDict); the audio
  column is read undecoded (bytes or path) or as an already decoded array.
- webdataset: ``data.path`` is a .tar, a folder of .tar or a glob; a sample is the members sharing a
  key; its audio is the member with an audio extension, its metadata a ``.json`` or ``.txt`` member.
"""

from __future__ import annotations

import glob
import json
import tarfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from s2train.audio import ArrayReader, AudioReader, SoundFileReader
from s2train.checks import check
from s2train.runs import jsonl_lines


@dataclass
class DataConfig:
    """Where raw audio comes from and which part of it this process takes."""

    source: str = "folder"  # folder | hf | webdataset
    path: str | None = None  # a folder, a `datasets.save_to_disk` folder, or a folder/glob of .tar
    extensions: list[str] = field(
        default_factory=lambda: ["wav", "flac", "ogg", "mp3", "opus", "aiff", "aif", "au"]
    )
    audio_column: str = "audio"  # hf: the column of audio (decoded or not)
    lang: str | None = None  # language of every file when the source does not say
    speaker: str | None = None  # speaker of every file when the source does not say (None: one per file)
    partition: int = 0  # this process's share: partition i of num_partitions
    num_partitions: int = 1

    def __post_init__(self) -> None:
        check(
            self.source in ("folder", "hf", "webdataset"),
            f"data.source must be folder, hf or webdataset, not {self.source!r}",
        )
        check(self.num_partitions >= 1, "data.num_partitions must be at least 1")
        check(
            0 <= self.partition < self.num_partitions,
            f"data.partition={self.partition} is outside 0..{self.num_partitions - 1}",
        )


@dataclass
class SourceItem:
    source: str  # stable id: relative path, "split/row", "shard.tar/key"
    open: Callable[[], AudioReader]
    lang: str | None = None
    speaker: str | None = None
    text: str | None = None
    version: str = ""  # changes when the audio changes (size and mtime of a file), where cheap to know
    location: str = ""  # where the audio lives on this machine; records name the source instead


def list_items(cfg: DataConfig) -> list[SourceItem]:
    if not cfg.path:
        raise ValueError("data.path is required: a folder of audio, a saved HF dataset, or webdataset tars")
    lister = {"folder": _folder_items, "hf": _hf_items, "webdataset": _webdataset_items}[cfg.source]
    items = lister(cfg)
    for item in items:
        item.lang = item.lang or cfg.lang
        item.speaker = item.speaker or cfg.speaker
    return items


def _meta_fields(meta: dict) -> dict:
    return {
        "lang": meta.get("lang") or meta.get("language"),
        "speaker": None
        if meta.get("speaker", meta.get("speaker_id")) is None
        else str(meta.get("speaker", meta.get("speaker_id"))),
        "text": meta.get("text") or meta.get("transcription"),
    }


def printable(name: str) -> str:
    """A file name as text that JSON and UTF-8 take: bytes that are not UTF-8 (which Python keeps as
    surrogates) become ``\\xNN``, so such a file is cleaned like any other and named in its records."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _folder_items(cfg: DataConfig) -> list[SourceItem]:
    root = Path(cfg.path)
    if not root.is_dir():
        raise ValueError(f"data.path={cfg.path} is not a folder (data.source=folder)")
    metadata: dict[str, dict] = {}
    meta_file = root / "metadata.jsonl"
    if meta_file.is_file():
        for _, where, row in jsonl_lines(meta_file):
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                raise ValueError(
                    f'{where} must be an object with a "file_name" (the audio file it describes)'
                )
            metadata[row["file_name"]] = _meta_fields(row)
    extensions = {e.lower().lstrip(".") for e in cfg.extensions}
    # dangling links and link loops are listed too: they are rejected as unreadable, with a record
    files = sorted(
        p
        for p in root.rglob("*")
        if (p.is_file() or (p.is_symlink() and not p.exists())) and p.suffix.lower().lstrip(".") in extensions
    )
    items = []
    for p in files:
        rel = printable(p.relative_to(root).as_posix())
        item = SourceItem(
            source=rel,
            open=lambda p=p: SoundFileReader(p),
            version=_version(p),
            location=str(p),
            **metadata.get(rel, {}),
        )
        if not item.text and (side := _sidecar(p)) is not None:
            item.text = _sidecar_text(side)
            item.version += f"+{_version(side)}"  # an edited transcript is a new input
        items.append(item)
    return items


def _sidecar(audio: Path) -> Path | None:
    """``<name>.txt`` or ``<name>.lab`` beside a recording, if there is one."""
    return next((side for s in (".txt", ".lab") if (side := audio.with_suffix(s)).is_file()), None)


def _sidecar_text(side: Path) -> str | None:
    """A transcript file's words (whitespace joined); None, with a warning, when it cannot be read as
    UTF-8 text: the recording is then transcribed by the ASR judge like one without a transcript."""
    try:
        return " ".join(side.read_text(encoding="utf-8").split()) or None
    except (OSError, UnicodeDecodeError) as error:
        warnings.warn(f"ignoring the transcript {side}: {error}", stacklevel=2)
        return None


def _version(path: Path) -> str:
    """Size and modification time; of the link itself when it leads nowhere."""
    stat = path.stat() if path.exists() else path.lstat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _hf_items(cfg: DataConfig) -> list[SourceItem]:
    import datasets

    try:
        loaded = datasets.load_from_disk(cfg.path)
    except FileNotFoundError as error:
        raise ValueError(f"data.path={cfg.path} is not a dataset saved with save_to_disk: {error}") from None
    splits = loaded if isinstance(loaded, datasets.DatasetDict) else {"": loaded}
    items = []
    for split in sorted(splits):
        ds = splits[split]
        if cfg.audio_column not in ds.column_names:
            raise ValueError(
                f"the dataset has no column {cfg.audio_column!r} (data.audio_column); it has {ds.column_names}"
            )
        if isinstance(ds.features[cfg.audio_column], datasets.Audio):
            ds = ds.cast_column(cfg.audio_column, datasets.Audio(decode=False))
        for row in range(len(ds)):
            item = SourceItem(source=f"{split}/{row}" if split else str(row), open=lambda: None)
            item.open = _with_metadata(item, ds, row, cfg.audio_column)
            items.append(item)
    return items


def _with_metadata(item: SourceItem, ds, row: int, audio_column: str) -> Callable[[], AudioReader]:
    """Open the row's audio and, in passing, fill the item's metadata from the row's other columns."""

    def opener() -> AudioReader:
        record = ds[row]
        for name, value in _meta_fields({k: v for k, v in record.items() if k != audio_column}).items():
            setattr(item, name, value or getattr(item, name))
        return _hf_reader(record[audio_column])

    return opener


def _hf_reader(value) -> AudioReader:
    if isinstance(value, dict) and value.get("array") is not None:
        return ArrayReader(value["array"], value["sampling_rate"])
    if isinstance(value, dict) and value.get("bytes"):
        return SoundFileReader(value["bytes"])
    if isinstance(value, dict) and value.get("path"):
        return SoundFileReader(value["path"])
    raise ValueError(f"unsupported audio value in the dataset: {type(value).__name__}")


@lru_cache(maxsize=8)
def _open_tar(path: str) -> tarfile.TarFile:
    return tarfile.open(path)


def _webdataset_items(cfg: DataConfig) -> list[SourceItem]:
    path = Path(cfg.path)
    if path.is_dir():
        tars = sorted(path.rglob("*.tar"))
        base = path
    else:
        tars = sorted(Path(p) for p in glob.glob(cfg.path))
        base = Path(cfg.path).parent if tars else path
    if not tars:
        raise ValueError(f"no .tar files at data.path={cfg.path} (data.source=webdataset)")
    extensions = {e.lower().lstrip(".") for e in cfg.extensions}
    items = []
    for tar_path in tars:
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        rel = tar_path.relative_to(base).as_posix() if tar_path.is_relative_to(base) else tar_path.name
        try:
            with tarfile.open(tar_path) as tar:
                for member in tar.getmembers():
                    if not member.isfile():
                        continue
                    folder, _, name = member.name.rpartition("/")
                    stem, _, ext = name.partition(".")
                    samples.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext.lower()] = member
        except (tarfile.TarError, OSError, EOFError) as error:  # the tar costs its samples, not the run
            items.append(SourceItem(source=rel, open=_failing(f"{type(error).__name__}: {error}")))
            continue
        for key, members in samples.items():
            audio_ext = next((e for e in members if e in extensions), None)
            if audio_ext is None:
                continue
            meta = {}
            if "json" in members:
                meta = _meta_fields(json.loads(_read_member(str(tar_path), members["json"])))
            elif "txt" in members:
                meta = {"text": _read_member(str(tar_path), members["txt"]).decode("utf-8").strip()}
            items.append(
                SourceItem(
                    source=f"{rel}/{key}",
                    open=lambda t=str(tar_path), m=members[audio_ext]: SoundFileReader(_read_member(t, m)),
                    **meta,
                )
            )
    return items


def _failing(message: str) -> Callable[[], AudioReader]:
    """An opener for a source that cannot be read: it is rejected as unreadable, with ``message``."""

    def opener() -> AudioReader:
        raise OSError(message)

    return opener


def _read_member(tar_path: str, member: tarfile.TarInfo) -> bytes:
    return _open_tar(tar_path).extractfile(member).read()
