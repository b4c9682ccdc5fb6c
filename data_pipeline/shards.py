"""Units of work, shared by every sharded stage (clean, tokenize); the shard format is ``s2train.shards``.

A stage divides its input into numbered units; unit ``u`` belongs to partition ``u % num_partitions``
(one SLURM array task each). A finished unit has written its shard (renamed into place) and then its
marker ``units/<u>.json``; a rerun does only the units without a marker, so a killed run loses at most
the unit in flight and never leaves a half file that looks done.
"""

from __future__ import annotations

import json
from pathlib import Path

from s2train.runs import remove_stale_temporaries, write_json_atomic


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
