"""Shared fixtures: the demo corpus and one uninterrupted clean run over it, made once per session
through the real CLI, exactly as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
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


def kill_after_units(overrides: list[str], run_dir: Path, units: int, poll_s: float) -> dict[str, int]:
    """Start ``python -m s2train <overrides>``, SIGKILL it (and its children) once ``units`` unit markers
    exist in ``run_dir/units``, and return the finished markers with their modification times."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "s2train", *overrides],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    markers = Path(run_dir) / "units"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and len(list(markers.glob("[0-9]*.json"))) < units:
        time.sleep(poll_s)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return {p.name: p.stat().st_mtime_ns for p in markers.glob("[0-9]*.json")}


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
