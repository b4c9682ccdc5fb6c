"""The one CLI: clear errors for unknown stages, misspelt keys and bad values; every shipped config
composes into the typed schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from s2train.__main__ import CONF_DIR
from s2train.cli import summary_table
from s2train.config import S2Config
from s2train.stages import STAGES, stage_runner
from tests.conftest import run_cli


def test_unknown_stage_names_the_known_ones():
    proc = run_cli("stage=bogus", check=False)
    assert proc.returncode != 0
    for name in STAGES:
        assert name in proc.stderr
    with pytest.raises(ValueError, match="known stages are: " + ", ".join(sorted(STAGES))):
        stage_runner("bogus")


def test_misspelt_key_fails_at_composition():
    proc = run_cli("stage=clean", "clean.fils_per_shard=3", check=False)
    assert proc.returncode != 0 and "fils_per_shard" in proc.stderr and "CleanConfig" in proc.stderr


def test_missing_stage_and_bad_values_get_a_sentence(tmp_path):
    proc = run_cli(check=False)
    assert proc.returncode == 2 and "choose a stage" in proc.stderr and "experiment=demo" in proc.stderr
    proc = run_cli("stage=clean", "data.num_partitions=0", f"run_root={tmp_path}", check=False)
    assert proc.returncode == 2 and "error: data.num_partitions must be at least 1" in proc.stderr
    proc = run_cli("stage=clean", f"data.path={tmp_path / 'absent'}", f"run_root={tmp_path}", check=False)
    assert proc.returncode == 2 and "is not a folder" in proc.stderr


def shipped(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("experiment", shipped("experiment"))
@pytest.mark.parametrize("judges", shipped("judges"))
def test_every_shipped_config_composes(experiment, judges):
    overrides = [f"experiment={experiment}", f"judges={judges}"]
    if judges != "offline":
        overrides += [
            "judges.asr.whisper.checkpoint=/models/whisper.pt",
            "judges.speaker.checkpoint=/models/ecapa",
        ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
        typed = OmegaConf.to_object(cfg)
    assert isinstance(typed, S2Config) and typed.stage in STAGES
    for stage in typed.pipeline.stages:
        assert stage in STAGES


@pytest.mark.parametrize("stage", shipped("stage"))
def test_every_stage_config_selects_a_registered_stage(stage):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"stage={stage}"])
    assert cfg.stage == stage and stage in STAGES


def test_experiment_can_run_one_of_its_stages_and_run_dir_overrides():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "config", overrides=["experiment=demo", "stage=clean", "run_dir=/tmp/x", "run_root=/data/runs"]
        )
    assert cfg.stage == "clean" and cfg.run_dir == "/tmp/x"
    assert cfg.data.path == "/data/runs/demo/demo_corpus/corpus"


def test_summary_table_lists_the_figures():
    table = summary_table({"stage": "clean", "files": 12, "kept_h": 0.25, "by_stage": {"vad": {}}})
    lines = table.splitlines()
    assert "stage clean" in lines[1] and any("files" in line and "12" in line for line in lines)
    assert not any("by_stage" in line for line in lines) and len({len(line) for line in lines}) == 1


def test_a_later_call_never_rewrites_the_record_of_a_run(tmp_path):
    """config.yaml keeps describing the outputs beside it: a failing call leaves no record, a call with
    another config records its own beside the first, the same config records nothing new."""
    from tests.conftest import read_jsonl

    run_dir = tmp_path / "eval"
    rows = [{"utt": "a", "lang": "en", "ref": "hello world", "hyp": "hello word"}]
    (tmp_path / "asr.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["stage=eval", "eval=transcripts", f"run_dir={run_dir}"]
    run_cli(*common, f"eval.input={tmp_path / 'asr.jsonl'}")
    first = (run_dir / "config.yaml").read_text()
    failed = run_cli(*common, f"eval.input={tmp_path / 'absent.jsonl'}", check=False)
    assert failed.returncode == 2 and "is not a file" in failed.stderr
    assert (run_dir / "config.yaml").read_text() == first and not list(run_dir.glob("config.*.yaml"))
    run_cli(*common, f"eval.input={tmp_path / 'asr.jsonl'}")  # the same config again
    assert not list(run_dir.glob("config.*.yaml"))
    run_cli(*common, f"eval.input={tmp_path / 'asr.jsonl'}", "eval.profile=f5")
    assert (run_dir / "config.yaml").read_text() == first
    assert "profile: f5" in (run_dir / "config.1.yaml").read_text() and (run_dir / "run.1.json").is_file()
    assert read_jsonl(tmp_path / "asr.jsonl") == rows


def test_a_run_dir_that_is_a_file_gets_a_sentence(tmp_path):
    (tmp_path / "target").write_text("not a folder")
    result = run_cli("stage=eval", "eval=transcripts", f"run_dir={tmp_path / 'target' / 'run'}", check=False)
    assert result.returncode == 2 and "is a file (or lies under one), not a folder" in result.stderr


def test_a_key_added_with_plus_must_exist_in_the_schema():
    """Hydra's own error suggests `+clean.fils_per_shard=3`, which it then accepts: it would be ignored."""
    result = run_cli("stage=eval", "eval=transcripts", "+clean.fils_per_shard=3", check=False)
    assert result.returncode == 2 and "unknown config keys ['clean.fils_per_shard']" in result.stderr
