"""Reading and writing webdataset shards: the one format of clean shards (``{key}.flac`` + ``{key}.json``)
and token shards (``{key}.codes.npy`` + ``{key}.json``), which the data pipeline writes and training
reads. Keys contain no dots, so a member's key is its name up to the first dot.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable
from pathlib import Path

from s2train.runs import atomic_path


def write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> None:
    """A tar of ``(name, payload)`` members, byte-identical for identical input, renamed into place."""
    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            tar.addfile(info, io.BytesIO(payload))


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """Samples of a webdataset tar: key -> {extension: payload}, in the tar's order (keys have no dots)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if member.isfile():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples
