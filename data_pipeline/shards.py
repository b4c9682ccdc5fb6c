"""Units of work and webdataset shards, shared by every sharded stage (clean, tokenize).

A stage divides its input into numbered units; unit ``u`` belongs to partition ``u % num_partitions``
(one SLURM array task each). A finished unit has written its shard (renamed into place) and then its
marker ``units/<u>.json``; a rerun does only the units without a marker, so a killed run loses at most
the unit in flight and never leaves a half file that looks done.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable
from pathlib import Path

from s2train.runs import atomic_path, remove_stale_temporaries, write_json_atomic


class UnitLedger:
    def __init__(self, run_dir: Path, n_units: int, partition: int, num_partitions: int):
        self.run_dir, self.n_units = Path(run_dir), n_units
        self.units_dir = self.run_dir / "units"
        self.shards_dir = self.run_dir / "shards"
        for folder in (self.units_dir, self.shards_dir):
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(folder)
        self.mine = [u for u in range(n_units) if u % num_partitions == partition]

    def marker(self, unit: int) -> Path:
        return self.units_dir / f"{unit:06d}.json"

    @property
    def todo(self) -> list[int]:
        return [u for u in self.mine if not self.marker(u).exists()]

    def finish(self, unit: int, record: dict) -> None:
        write_json_atomic(self.marker(unit), {"unit": unit, **record})

    def records(self) -> list[dict]:
        """The markers of every finished unit, of every partition, in unit order."""
        return [json.loads(p.read_text()) for p in sorted(self.units_dir.glob("[0-9]*.json"))]


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
