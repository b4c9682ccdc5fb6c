"""``stage=eval`` through the CLI: transcript scoring, scoring a folder of any system's audio (skips,
resume, partitions, report), and the Whisper and WavLM-ECAPA judges loaded from tiny random checkpoints
saved in their official formats, through the paths a user gives."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from data_pipeline.demo_corpus import write_seedtts_set
from tests.conftest import run_cli


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text(encoding="utf-8"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------- transcripts


TRANSCRIPTS = [
    # ref 4 words, "it’s" (curly) is "its" after deletion, while the reference keeps "it's": 1 sub
    {"utt": "en-1", "lang": "en", "ref": "It's a good day.", "hyp": " It’s a good day."},
    # 5 words, 1 deletion ("the") and 1 substitution (20 -> twenty)
    {"utt": "en-2", "lang": "en", "ref": "Buy the 20 red apples!", "hyp": "buy twenty red apples"},
    # 7 characters, the hypothesis in traditional characters is simplified first: 0 errors
    {"utt": "zh-1", "lang": "zh", "ref": "我们今天去公园。", "hyp": "我們今天去公園"},
    # 4 characters, 1 inserted
    {"utt": "zh-2", "lang": "zh", "ref": "你好，世界", "hyp": "你好啊世界"},
]


def test_transcripts_mode_reports_the_official_mean_and_each_utterance(tmp_path):
    source = write_jsonl(tmp_path / "asr.jsonl", TRANSCRIPTS)
    run_dir = tmp_path / "official"
    run_cli("stage=eval", "eval=transcripts", f"eval.input={source}", f"run_dir={run_dir}")
    out = results(run_dir)
    expected = {"en-1": 1 / 4, "en-2": 2 / 5, "zh-1": 0.0, "zh-2": 1 / 4}
    assert out["per_utt"] == pytest.approx(expected)
    assert out["wer"] == round(100 * sum(expected.values()) / 4, 3) == 22.5
    assert out["wer_by_lang"] == {"en": 32.5, "zh": 12.5}
    # the corpus figure is reported beside it, and labelled: 4 errors over 20 reference words
    assert out["corpus_wer_not_official"] == 20.0
    rows = [json.loads(line) for line in (run_dir / "scores.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows[2]["hyp_norm"] == "我 们 今 天 去 公 园"

    f5_dir = tmp_path / "f5"
    run_cli("stage=eval", "eval=transcripts", f"eval.input={source}", "eval.profile=f5", f"run_dir={f5_dir}")
    f5 = results(f5_dir)
    assert f5["per_utt"]["en-1"] == 0.0  # F5-TTS deletes the ASCII apostrophe too
    assert f5["wer"] == round(100 * (2 / 5 + 1 / 4) / 4, 3)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"utt": "x", "lang": "fr", "ref": "a", "hyp": "a"}, "lang must be en or zh"),
        ({"utt": "x", "lang": "en", "ref": "a"}, '"utt", "lang", "ref" and "hyp"'),
    ],
)
def test_transcripts_mode_refuses_bad_lines_with_a_sentence(tmp_path, row, message):
    source = write_jsonl(tmp_path / "bad.jsonl", [row])
    proc = run_cli(
        "stage=eval", "eval=transcripts", f"eval.input={source}", f"run_dir={tmp_path / 'r'}", check=False
    )
    assert proc.returncode == 2
    assert message in proc.stderr and "line 1" in proc.stderr


# ----------------------------------------------------------------------------- scoring a system's folder


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory) -> Path:
    """The demo's Seed-TTS-Eval style set (flite voices), and a "system" folder holding two of the first
    three utterances: the ground-truth clips themselves."""
    root = tmp_path_factory.mktemp("seedtts")
    meta = write_seedtts_set(root / "set", 16000)
    system = root / "system"
    system.mkdir()
    for utt in ("awb-00", "rms-00"):
        shutil.copy(root / "set" / "wavs" / f"{utt}.wav", system / f"{utt}.wav")
    return meta


def score(meta: Path, run_dir: Path, *extra: str):
    return run_cli(
        "stage=eval",
        f"eval.meta={meta}",
        f"eval.gen_dir={meta.parent.parent / 'system'}",
        "eval.profile=demo",
        "eval.limit=3",
        "eval.progress=false",
        f"run_dir={run_dir}",
        *extra,
    )


def test_scoring_a_folder_counts_skips_writes_the_report_and_resumes(demo_set, tmp_path):
    run_dir = tmp_path / "eval"
    score(demo_set, run_dir, "eval.dnsmos=true")
    out = results(run_dir)
    assert out["complete"] and out["skipped"] == 1 and out["skipped_utts"] == ["awb-01"]
    assert set(out["per_utt"]) == {"awb-00", "rms-00"}
    assert out["systems"]["system"]["utterances"] == 2
    assert out["systems"]["ground truth"]["utterances"] == 3
    # the system's clips are the ground truth's: the same transcripts, and speaker similarity near 1
    rows = [json.loads(line) for line in (run_dir / "scores.jsonl").read_text().splitlines()]
    by_key = {(r["system"], r["utt"]): r for r in rows}
    for utt in ("awb-00", "rms-00"):
        assert by_key[("generated", utt)]["hyp"] == by_key[("ground_truth", utt)]["hyp"]
    assert out["wer"] < 60  # pocketsphinx on flite speech
    assert 0.5 < out["sim"] <= 1.0 and 1.0 < out["dnsmos_ovrl"] < 5.0
    assert not out["comparable"] and "pocketsphinx" in out["comparable_reason"]
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "not comparable" in report and "Seed-TTS (ICL)" in report and "arxiv.org" in report
    assert (run_dir / "report.png").stat().st_size > 10_000
    assert (run_dir / "scores.csv").read_text().count("\n") == 1 + 5

    # a rerun scores nothing again
    part = run_dir / "parts" / "part-00000.jsonl"
    before = part.read_text()
    with open(part, "a") as f:
        f.write('{"system": "generated", "utt": "torn')  # a line cut by a crash is ignored
    score(demo_set, run_dir, "eval.dnsmos=true")
    after = part.read_text()
    assert (
        after.startswith(before) and after.count("\n") == before.count("\n") + 1
    )  # only the torn line closed
    assert results(run_dir)["wer"] == out["wer"]


def test_partitions_share_the_work_and_the_last_one_writes_the_report(demo_set, tmp_path):
    run_dir = tmp_path / "eval"
    score(demo_set, run_dir, "eval.dnsmos=false", "data.num_partitions=2", "data.partition=1")
    first = results(run_dir)
    assert not first["complete"] and first["missing"] > 0
    assert not (run_dir / "report.md").exists()
    score(demo_set, run_dir, "eval.dnsmos=false", "data.num_partitions=2", "data.partition=0")
    second = results(run_dir)
    assert second["complete"] and (run_dir / "report.md").is_file()
    shares = [len((run_dir / "parts" / f"part-0000{i}.jsonl").read_text().splitlines()) for i in (0, 1)]
    assert sum(shares) == 5 and min(shares) >= 1  # 2 generated + 3 ground truth, split


def test_whisper_and_wavlm_ecapa_load_from_official_format_checkpoints(demo_set, tmp_path):
    """A tiny random Whisper in openai-whisper's .pt format (dims + model_state_dict) and a tiny random
    WavLM-ECAPA as UniSpeech's {'model': state_dict}, both given on the command line as a user would."""
    import whisper
    from whisper.model import ModelDimensions, Whisper

    from s2train.judges.asr import ASRConfig, WhisperASR, WhisperConfig
    from s2train.judges.sim_wavlm import TINY_ARCH, build_sim_model, save_checkpoint

    torch.manual_seed(0)
    dims = ModelDimensions(  # large-v3's mel bins and vocabulary, everything else tiny
        n_mels=128, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=1,
        n_vocab=51866, n_text_ctx=448, n_text_state=32, n_text_head=2, n_text_layer=1,
    )  # fmt: skip
    model = Whisper(dims)
    with torch.no_grad():  # whisper leaves some parameters (positional embeddings) uninitialised
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
    whisper_path = tmp_path / "large-v3-tiny-random.pt"
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, whisper_path)
    sim_path = tmp_path / "wavlm_large_finetune.pth"
    save_checkpoint(build_sim_model(**TINY_ARCH).state_dict(), sim_path)

    asr = WhisperASR(ASRConfig(backend="whisper", whisper=WhisperConfig(checkpoint=str(whisper_path))))
    loaded = asr.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert asr.model.is_multilingual and asr.model.num_languages == 100  # large-v3's vocabulary
    wav = whisper.load_audio(str(demo_set.parent / "wavs" / "awb-00.wav"))
    assert asr.transcribe_window(wav, "en") == asr.transcribe_window(wav, "en")  # greedy: deterministic

    run_dir = tmp_path / "eval"
    run_cli(
        "stage=eval",
        f"eval.meta={demo_set}",
        f"eval.gen_dir={demo_set.parent.parent / 'system'}",
        "eval.limit=1",
        "eval.ground_truth=false",
        "eval.dnsmos=false",
        "eval.asr=whisper",  # openai-whisper: the labelled alternative to the official transformers call
        f"eval.whisper={whisper_path}",
        f"eval.sim_checkpoint={sim_path}",
        f"run_dir={run_dir}",
    )
    out = results(run_dir)
    assert out["profile"] == "official" and out["comparable"] is False  # eval.limit cuts the set
    assert "its ASR is whisper, not whisper_hf" in out["comparable_reason"]
    assert "large-v3-tiny-random" in out["asr_model"] and "greedy" in out["asr_model"]
    assert out["sim_model"] == "wavlm-large-ecapa"
    assert -1.0 <= out["sim"] <= 1.0 and out["wer"] >= 0.0


def test_official_profile_without_local_models_says_what_to_give(demo_set, tmp_path):
    proc = run_cli(
        "stage=eval", f"eval.meta={demo_set}", f"run_dir={tmp_path / 'r'}", "eval.gen_dir=/tmp", check=False
    )
    assert proc.returncode == 2 and "local Whisper folder in the save_pretrained layout" in proc.stderr


def test_a_launcher_rank_becomes_the_partition_unless_partitions_are_given(monkeypatch):
    from data_pipeline.sources import DataConfig
    from eval.stage import with_launcher_share
    from s2train.config import S2Config

    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    data = with_launcher_share(S2Config(stage="eval")).data
    assert (data.partition, data.num_partitions) == (3, 8)
    given = S2Config(stage="eval", data=DataConfig(partition=1, num_partitions=2))
    assert with_launcher_share(given).data.partition == 1
    monkeypatch.delenv("SLURM_NTASKS")
    assert with_launcher_share(S2Config(stage="eval")).data.num_partitions == 1
