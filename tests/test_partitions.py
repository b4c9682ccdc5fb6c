"""Partitions (one per SLURM array task) split the work without overlap and together equal one run;
the clean stage also runs on webdataset and Hugging Face inputs."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile

import pytest

from tests.conftest import ROOT, read_jsonl, run_cli

FILES = ["kal_00.wav", "rms_44k.wav", "bad_corrupt.wav", "bad_tone.wav"]


def rows_for(path, sources):
    return [r for r in read_jsonl(path) if r["source"] in sources]


def test_two_partitions_equal_one_run(demo_root, demo_corpus, demo_clean, tmp_path):
    subset = tmp_path / "subset"
    subset.mkdir()
    for name in FILES:
        shutil.copy(demo_corpus / name, subset / name)
    shutil.copy(demo_corpus / "metadata.jsonl", subset / "metadata.jsonl")
    run_dir = tmp_path / "clean"
    common = [
        "experiment=demo",
        f"run_root={demo_root}",
        f"run_dir={run_dir}",
        f"data.path={subset}",
        "clean.files_per_shard=1",
    ]
    # array task 1 of 2, through the SLURM script itself (bash ignores the #SBATCH lines)
    env = {
        **os.environ,
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_ARRAY_TASK_COUNT": "2",
        "SLURM_CPUS_PER_TASK": "2",
    }
    subprocess.run(
        ["bash", "slurm/clean_array.sbatch", *common],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=900,
    )
    stats = json.loads((run_dir / "stats.json").read_text())
    assert not stats["complete"] and stats["units_done"] == 2 and stats["units_total"] == 4
    run_cli("stage=clean", *common, "data.partition=0", "data.num_partitions=2", "clean.progress=false")
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["complete"] and stats["files"] == len(FILES)
    for name in ("manifest.jsonl", "rejects.jsonl"):
        mine = read_jsonl(run_dir / name)
        for row in mine:
            row.pop("shard", None)
        reference = rows_for(demo_clean / name, set(FILES))
        for row in reference:
            row.pop("shard", None)
        key = lambda r: (r["source"], r["start"])  # noqa: E731
        assert sorted(mine, key=key) == sorted(reference, key=key)
    assert len(read_jsonl(run_dir / "manifest.jsonl")) >= 2


def test_clean_reads_webdataset_and_hf_inputs(demo_root, demo_corpus, demo_clean, tmp_path):
    import datasets

    source = "kal_00.wav"
    tar_dir = tmp_path / "wds"
    tar_dir.mkdir()
    with tarfile.open(tar_dir / "raw-000.tar", "w") as tar:
        for name, payload in (
            ("kal_00.wav", (demo_corpus / source).read_bytes()),
            ("kal_00.json", json.dumps({"lang": "en", "speaker": "kal"}).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    ds = datasets.Dataset.from_dict({"audio": [str(demo_corpus / source)], "lang": ["en"]})
    ds.cast_column("audio", datasets.Audio()).save_to_disk(str(tmp_path / "hf"))

    reference = rows_for(demo_clean / "manifest.jsonl", {source})
    for kind, path, expected_source in (
        ("webdataset", tar_dir, "raw-000.tar/kal_00"),
        ("hf", tmp_path / "hf", "0"),
    ):
        run_dir = tmp_path / kind
        run_cli(
            "experiment=demo",
            "stage=clean",
            f"run_root={demo_root}",
            f"run_dir={run_dir}",
            f"data.source={kind}",
            f"data.path={path}",
            "clean.progress=false",
        )
        kept = read_jsonl(run_dir / "manifest.jsonl")
        assert [r["source"] for r in kept] == [expected_source] * len(reference)
        assert [(r["start"], r["end"], r["asr_text"]) for r in kept] == [
            (r["start"], r["end"], r["asr_text"]) for r in reference
        ]


def test_a_starting_partition_leaves_the_others_temporaries_alone(tmp_path):
    """Partition 1 starting must not delete the shard partition 0 is writing at that moment."""
    from data_pipeline.shards import UnitLedger

    for folder in ("shards", "units"):
        (tmp_path / folder).mkdir()
    theirs = [tmp_path / "shards" / ".shard-000000.tar.k2j4.tmp", tmp_path / "units" / ".000002.json.x9.tmp"]
    mine = [tmp_path / "shards" / ".shard-000001.tar.a1b2.tmp", tmp_path / "units" / ".000003.json.q7.tmp"]
    for path in theirs + mine:
        path.write_bytes(b"half")
    UnitLedger(tmp_path, 4, partition=1, num_partitions=2)
    assert all(p.exists() for p in theirs) and not any(p.exists() for p in mine)


def test_the_merge_lock_excludes_a_second_process(tmp_path):
    """Two partitions rebuilding manifest.jsonl at once: the second waits for the first, so the last one
    to write reads every marker."""
    import fcntl
    import subprocess
    import sys

    from data_pipeline.shards import UnitLedger

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from data_pipeline.shards import UnitLedger; "
            f"ledger = UnitLedger({str(tmp_path)!r}, 2, 0, 2)\n"
            "with ledger.merging():\n    print('held', flush=True); time.sleep(30)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with open(tmp_path / ".merge.lock", "a") as lock, pytest.raises(BlockingIOError):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        holder.kill()
        holder.wait()
    with UnitLedger(tmp_path, 2, 1, 2).merging():  # free again once the holder is gone
        pass


@pytest.mark.slow
def test_concurrent_partitions_killed_and_restarted_equal_one_run(demo_root, demo_corpus, tmp_path):
    """Two partitions of one run directory run at the same time, both killed at random points and
    restarted, five rounds over; then both finish. Shards and manifest equal an uninterrupted run's."""
    import random
    import signal
    import sys
    import time

    files = ["kal_00.wav", "rms_44k.wav", "bad_corrupt.wav", "bad_tone.wav", "slt_00.wav", "awb_00.wav"]
    subset = tmp_path / "subset"
    subset.mkdir()
    for name in files:
        shutil.copy(demo_corpus / name, subset / name)
    shutil.copy(demo_corpus / "metadata.jsonl", subset / "metadata.jsonl")
    common = ["experiment=demo", "stage=clean", f"run_root={demo_root}", f"data.path={subset}"]
    common += ["clean.files_per_shard=1"]
    common += ["clean.progress=false", "data.num_partitions=2"]
    concurrent = tmp_path / "concurrent"

    def start(partition: int) -> subprocess.Popen:
        args = [*common, f"run_dir={concurrent}", f"data.partition={partition}"]
        return subprocess.Popen(
            [sys.executable, "-m", "s2train", *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    rng = random.Random(0)
    for _ in range(5):
        procs = [start(0), start(1)]
        time.sleep(rng.uniform(4.0, 14.0))
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    procs = [start(0), start(1)]
    assert [proc.wait(timeout=900) for proc in procs] == [0, 0]

    single = tmp_path / "single"
    run_cli(*[c for c in common if c != "data.num_partitions=2"], f"run_dir={single}")
    assert read_jsonl(concurrent / "manifest.jsonl") == read_jsonl(single / "manifest.jsonl")
    assert read_jsonl(concurrent / "rejects.jsonl") == read_jsonl(single / "rejects.jsonl")
    shards = sorted(p.name for p in (single / "shards").iterdir())
    assert shards == sorted(p.name for p in (concurrent / "shards").iterdir())
    for name in shards:
        assert (concurrent / "shards" / name).read_bytes() == (single / "shards" / name).read_bytes(), name
    assert json.loads((concurrent / "stats.json").read_text())["complete"]
