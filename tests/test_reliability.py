"""No single bad input stops a run: odd files become rejects with a reason and the run goes on, every
numeric setting is checked with a sentence, and outputs are readable by colleagues (the umask holds)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import soundfile as sf

from data_pipeline.clean import CleanConfig
from s2train.judges.quality import QualityConfig
from s2train.judges.suite import JudgesConfig
from s2train.judges.vad import FRAME, SileroVAD, VADConfig
from s2train.runs import write_json_atomic
from tests.conftest import read_jsonl, run_cli


def test_vad_takes_a_block_shorter_than_one_frame():
    """A decoding block plus its carried remainder under one 512-sample frame (a file of 60 s + up to
    32 ms with 60 s blocks) used to hand silero-vad an empty frame."""
    vad = SileroVAD(VADConfig())
    noise = np.random.default_rng(0).standard_normal(2 * 16000 + 100).astype(np.float32) * 0.01
    probs = vad.probabilities([noise[:32000], noise[32000:]])  # the second block is 100 samples
    assert len(probs) == -(-len(noise) // FRAME) and np.isfinite(probs).all()
    assert len(vad.probabilities([noise[:320]])) == 1  # a 20 ms file: one padded frame


def test_a_poisoned_file_costs_one_file_and_the_run_goes_on(tmp_path, flite_wav):
    raw = tmp_path / "raw"
    raw.mkdir()
    speech = flite_wav("awb", "The quick brown fox jumps over the lazy dog near the river bank.")
    sf.write(raw / "good.wav", speech, 16000)
    nan = speech.copy()
    nan[len(nan) // 2] = np.nan
    sf.write(raw / "one_nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(raw / "twenty_ms.wav", speech[:320], 16000)
    # one second blocks: a file of 3 s + 10 ms leaves a last block under one VAD frame
    sf.write(raw / "block_edge.wav", np.concatenate([speech[: 3 * 16000], speech[:160]]), 16000)
    sf.write(raw / "cafe.wav", speech, 16000)
    os.rename(raw / "cafe.wav", os.fsencode(raw) + b"/caf\xe9.wav")  # a Latin-1 name: not valid UTF-8
    run_dir = tmp_path / "clean"
    run_cli(
        "stage=clean",
        f"data.path={raw}",
        f"run_dir={run_dir}",
        "clean.sample_rate=16000",
        "clean.block_s=1.0",
        "clean.progress=false",
        "judges.threads=0",  # torch's default, like train.threads=0
        "judges.quality.dnsmos_ovrl_min=2.0",
    )
    rejects = {r["source"]: r for r in read_jsonl(run_dir / "rejects.jsonl")}
    assert rejects["one_nan.wav"]["reason"] == "non_finite_samples"
    assert rejects["one_nan.wav"]["values"] == {"samples": 1}
    assert rejects["twenty_ms.wav"]["reason"] == "too_short"
    assert all(r["reason"] != "unreadable" for r in rejects.values()), rejects
    kept = {row["source"] for row in read_jsonl(run_dir / "manifest.jsonl")}
    assert {"good.wav", "caf\\xe9.wav"} <= kept  # named in its records, cleaned like any other


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: CleanConfig(block_s=0), "clean.block_s"),
        (lambda: CleanConfig(block_s=-1), "clean.block_s"),
        (lambda: QualityConfig(dnsmos_hop_s=0), "dnsmos_hop_s must be positive"),
        (lambda: QualityConfig(onnx_threads=-1), "onnx_threads"),
        (lambda: QualityConfig(clipping_max_ratio=2), "clipping_max_ratio"),
        (lambda: JudgesConfig(threads=-1), "judges.threads"),
    ],
)
def test_numeric_settings_are_checked_with_a_sentence(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_outputs_honour_the_umask(tmp_path, umask, mode):
    import s2train.runs as runs

    old = os.umask(umask)
    saved = runs.UMASK
    try:
        runs.UMASK = umask  # what a process started under this umask reads
        write_json_atomic(tmp_path / "results.json", {"ok": True})
    finally:
        runs.UMASK = saved
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == mode


def test_a_new_process_records_its_umask(tmp_path):
    """The module reads the umask it was started with: a stage's files are 0644 under the usual 022."""
    import subprocess
    import sys

    code = (
        "import os; os.umask(0o022); from s2train.runs import write_json_atomic; "
        f"write_json_atomic({str(tmp_path / 'r.json')!r}, {{}})"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644


def test_a_meta_list_cannot_name_clips_outside_the_allowed_folders(tmp_path):
    from eval.meta import read_meta

    lists = tmp_path / "set"
    (lists / "wavs").mkdir(parents=True)
    (tmp_path / "secret.wav").write_bytes(b"")
    meta = lists / "meta.lst"
    meta.write_text("a|Prompt.|wavs/p.wav|Target.\nb|Prompt.|../secret.wav|Target.\n")
    with pytest.raises(ValueError, match="line 2 names '../secret.wav'.*outside the allowed folders"):
        read_meta(meta)
    meta.write_text("a|Prompt.|wavs/p.wav|Target.|/etc/shadow\n")
    with pytest.raises(ValueError, match="line 1 names '/etc/shadow'"):
        read_meta(meta)
    (lists / "wavs" / "link.wav").symlink_to(tmp_path / "secret.wav")
    meta.write_text("a|Prompt.|wavs/link.wav|Target.\n")
    with pytest.raises(ValueError, match="outside the allowed folders"):
        read_meta(meta)
    assert read_meta(meta, [tmp_path])[0].prompt_wav == (tmp_path / "secret.wav").resolve()  # eval.audio_dirs


def test_eval_refuses_a_meta_list_in_the_other_language(tmp_path):
    """Chinese targets under English rules scored a 2,300% WER without a word of warning."""
    lists = tmp_path / "set"
    lists.mkdir()
    (lists / "meta.lst").write_text("a|你好。|p.wav|今天天气很好。\nb|你好。|p.wav|我们去公园吧。\n")
    result = run_cli(
        "stage=eval",
        f"eval.meta={lists / 'meta.lst'}",
        f"eval.gen_dir={lists}",
        "eval.profile=demo",
        f"run_dir={tmp_path / 'eval'}",
        check=False,
    )
    assert result.returncode == 2 and "set eval.lang=zh" in result.stderr


def test_a_malformed_metadata_line_is_named(tmp_path):
    from data_pipeline.sources import DataConfig, list_items

    (tmp_path / "a.wav").write_bytes(b"")
    meta = tmp_path / "metadata.jsonl"
    for text, message in (
        ('{"file_name": "a.wav"}\n{"file_name": "b.wav", \n', "metadata.jsonl line 2 is not JSON"),
        (
            '{"file_name": "a.wav"}\n\n["a.wav"]\n',
            'metadata.jsonl line 3 must be an object with a "file_name"',
        ),
        ('{"text": "no file"}\n', 'line 1 must be an object with a "file_name"'),
    ):
        meta.write_text(text)
        with pytest.raises(ValueError, match=message):
            list_items(DataConfig(path=str(tmp_path)))


def test_links_that_lead_nowhere_and_corrupt_tars_are_listed_to_be_rejected(tmp_path):
    """A dangling link, a link loop and a corrupt tar each become an item whose opening fails (a reject
    with its error in rejects.jsonl), instead of vanishing or stopping the listing."""
    from data_pipeline.sources import DataConfig, list_items

    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "gone.wav").symlink_to(folder / "deleted.wav")
    (folder / "a.wav").symlink_to(folder / "b.wav")
    (folder / "b.wav").symlink_to(folder / "a.wav")
    items = {i.source: i for i in list_items(DataConfig(path=str(folder)))}
    assert set(items) == {"gone.wav", "a.wav", "b.wav"}
    for item in items.values():
        with pytest.raises(Exception):  # noqa: B017 - libsndfile's own error, recorded as "unreadable"
            item.open()

    tars = tmp_path / "tars"
    tars.mkdir()
    (tars / "broken.tar").write_bytes(b"not a tar at all" * 64)
    [item] = list_items(DataConfig(source="webdataset", path=str(tars)))
    with pytest.raises(OSError, match="ReadError"):
        item.open()
