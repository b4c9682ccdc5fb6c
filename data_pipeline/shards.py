"""Units of work, shared by every sharded stage (clean, tokenize); the shard format is ``s2train.shards``.

A stage divides its input into numbered units; unit ``u`` belongs to partition ``u % num_partitions``
(one SLURM array task each). A finished unit has written its shard (renamed into place) and then its
marker ``units/<u>.json``; a rerun does only the units without a marker, so a killed run loses at most
the unit in flight and never leaves a half file that looks done.

Partitions may run at the same time in one run directory: each removes only its own units' stale
temporaries, and the stage-wide files rebuilt from the markers (``manifest.jsonl``, ...) are rebuilt under
an exclusive lock (``merging``), so the last partition to finish always writes them from every marker.
"""

from __future__ import annotations

import fcntl
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from s2train.runs import remove_stale_temporaries, write_json_atomic

# shard-000003.tar, tokens-000003.tar, 000003.json
UNIT_FILE = re.compile(r"^(?:[a-z]+-)?(\d+)\.(?:tar|json)$")


def unit_of(name: str) -> int | None:
    """The unit a shard or marker file name belongs to (None for any other name)."""
    match = UNIT_FILE.match(name)
    return int(match.group(1)) if match else None


class UnitLedger:
    def __init__(self, run_dir: Path, n_units: int, partition: int, num_partitions: int):
        self.run_dir, self.n_units = Path(run_dir), n_units
        self.units_dir = self.run_dir / "units"
        self.shards_dir = self.run_dir / "shards"
        self.mine = [u for u in range(n_units) if u % num_partitions == partition]
        mine = set(self.mine)
        for folder in (self.units_dir, self.shards_dir):
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(folder, lambda target: unit_of(target) in mine)

    def marker(self, unit: int) -> Path:
        return self.units_dir / f"{unit:06d}.json"

    @property
    def todo(self) -> list[int]:
        return [u for u in self.mine if not self.marker(u).exists()]

    def finish(self, unit: int, record: dict) -> None:
        write_json_atomic(self.marker(unit), {"unit": unit, **record})

    @contextmanager
    def merging(self) -> Iterator[None]:
        """Hold the run directory's merge lock (``flock``): rebuild the stage-wide files inside it."""
        with open(self.run_dir / ".merge.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def records(self) -> list[dict]:
        """The markers of every finished unit, of every partition, in unit order."""
        return [json.loads(p.read_text()) for p in sorted(self.units_dir.glob("[0-9]*.json"))]
