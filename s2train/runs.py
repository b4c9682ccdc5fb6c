"""Run directories and crash-safe files.

A run directory is stable (``run_root/<experiment name>/<stage>``, not a timestamp) so a requeued job
finds its own work. It holds the resolved config, the git commit and the seed. Files are written to a
temporary name in the same folder and renamed, so a killed run never leaves a half file that looks done.
"""

from __future__ import annotations

import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _umask()  # the process's, read once


def stage_run_dir(cfg) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    return Path(cfg.run_root) / cfg.name / cfg.stage


def stage_input(cfg, stage: str, given: str | None = None) -> Path:
    """The input a stage reads from an earlier one: ``given`` when the user set it, else that stage's run
    directory in this experiment, ``run_root/name/<stage>``."""
    return Path(given) if given else Path(cfg.run_root) / cfg.name / stage


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_run_dir(cfg) -> list[Path]:
    """Create the run directory and record what this run is: resolved config, commit, seed, host.

    The first call records ``config.yaml`` and ``run.json``. A later call with the same config leaves them
    as they are; a call with another config records its own beside them (``config.1.yaml`` and
    ``run.1.json``, then ``.2``, ...), so the first record still describes what the first call made.
    Returns the files this call wrote: the CLI removes them again when the call stops on a user error.
    """
    run_dir = Path(cfg.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"run_dir={run_dir} is a file (or lies under one), not a folder") from None
    except PermissionError:
        raise ValueError(f"cannot create run_dir={run_dir}: permission denied") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ValueError(f"run_dir={run_dir} is not writable")
    seed_everything(cfg.seed)
    text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    config, record, n = run_dir / "config.yaml", run_dir / "run.json", 0
    while config.exists():
        if config.read_text(encoding="utf-8") == text:
            return []  # this config is recorded already
        n += 1
        config, record = run_dir / f"config.{n}.yaml", run_dir / f"run.{n}.json"
    write_text_atomic(config, text)
    import torch

    write_json_atomic(
        record,
        {
            "stage": cfg.stage,
            "seed": cfg.seed,
            "git": git_commit(),
            "argv": sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": socket.gethostname(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    )
    return [config, record]


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; outputs are shared as any new file would be
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)  # again: some writers (safetensors) make the file anew, 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def remove_stale_temporaries(folder: Path, mine: Callable[[str], bool] = lambda target: True) -> int:
    """Delete the ``.name.*.tmp`` files a killed run left behind whose target ``name`` is ``mine`` (another
    process may be writing the others right now); returns how many."""
    stale = list(Path(folder).glob(".*.tmp")) if Path(folder).exists() else []
    stale = [tmp for tmp in stale if mine(tmp.name[1:].rsplit(".", 2)[0])]
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return len(stale)


def append_jsonl(path: Path, row: dict) -> None:
    """Append one record to a log a rerun reads back (``read_appended``), on disk before this returns."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_appended(path: Path) -> list[Any]:
    """The records of a log this project appends to, in order; a line a kill cut short is left out."""
    if not Path(path).exists():
        return []
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def jsonl_lines(path: Path) -> Iterator[tuple[int, str, Any]]:
    """``(line number, where, value)`` for each non-blank line of a user's JSONL file, ``where`` naming the file and
    line for error messages; a line that is not JSON is refused with that name."""
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{Path(path).name} line {line_no}"
        try:
            yield line_no, where, json.loads(line)
        except ValueError as error:
            raise ValueError(f"{where} is not JSON: {error}") from error
