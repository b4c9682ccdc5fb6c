"""Shared fixtures: the demo corpus and one uninterrupted clean run over it, made once per session
through the real CLI, exactly as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


def run_cli(*overrides: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m s2train <overrides>`` in a subprocess; returns the finished process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "s2train", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"s2train {' '.join(overrides)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """``python -m s2train experiment=demo`` into a fresh run root: demo corpus, then clean."""
    root = tmp_path_factory.mktemp("runs")
    run_cli("experiment=demo", f"run_root={root}")
    return root


@pytest.fixture(scope="session")
def demo_corpus(demo_root) -> Path:
    return demo_root / "demo" / "demo_corpus" / "corpus"


@pytest.fixture(scope="session")
def demo_clean(demo_root) -> Path:
    return demo_root / "demo" / "clean"


@pytest.fixture(scope="session")
def truth(demo_corpus) -> dict[str, dict]:
    return {row["file"]: row for row in read_jsonl(demo_corpus / "truth.jsonl")}


@pytest.fixture(scope="session")
def flite_wav(tmp_path_factory):
    """Synthesise one flite sentence at 16 kHz: ``flite_wav(voice, text) -> np.ndarray``."""
    from data_pipeline.demo_corpus import synthesize

    cache: dict[tuple[str, str], object] = {}

    def make(speaker: str, text: str):
        if (speaker, text) not in cache:
            cache[speaker, text] = synthesize(speaker, text, 16000)
        return cache[speaker, text]

    return make
