"""Partitions (one per SLURM array task) split the work without overlap and together equal one run;
the clean stage also runs on webdataset and Hugging Face inputs."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile

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
