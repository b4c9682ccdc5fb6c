"""A clean run killed part-way (SIGKILL to the real process) and started again finishes what is left,
redoes nothing that was finished and ends with the manifest of an uninterrupted run."""

from __future__ import annotations

from tests.conftest import kill_after_units, read_jsonl, run_cli


def test_killed_clean_run_resumes_to_the_uninterrupted_manifest(demo_root, demo_clean, tmp_path):
    run_dir = tmp_path / "clean"
    overrides = [
        "experiment=demo",
        "stage=clean",
        f"run_root={demo_root}",
        f"run_dir={run_dir}",
        "clean.progress=false",
        "clean.files_per_shard=2",  # as the demo_root fixture's run (DEMO_SHORT)
    ]
    finished = kill_after_units(overrides, run_dir, units=2, poll_s=0.2)
    units = run_dir / "units"
    total = len(list(read_jsonl(demo_clean / "manifest.jsonl")))
    assert 2 <= len(finished) < len(list((demo_clean / "units").glob("[0-9]*.json"))), "kill came too late"
    assert not (run_dir / "manifest.jsonl").exists() or len(read_jsonl(run_dir / "manifest.jsonl")) < total

    run_cli(*overrides)
    for name, mtime in finished.items():  # finished units were not redone
        assert (units / name).stat().st_mtime_ns == mtime
    resumed = read_jsonl(run_dir / "manifest.jsonl")
    uninterrupted = read_jsonl(demo_clean / "manifest.jsonl")
    for row in resumed + uninterrupted:
        row.pop("shard")
    assert resumed == uninterrupted
    assert len({m["id"] for m in resumed}) == len(resumed)
    assert read_jsonl(run_dir / "rejects.jsonl") == read_jsonl(demo_clean / "rejects.jsonl")
    assert not list(run_dir.rglob(".*.tmp")), "a temporary file was left behind"
