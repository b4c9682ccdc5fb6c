"""``stage=finetune`` on the demo: the SFT model learns festival's ked, a voice the demo never trains on,
from the folder ``demo_corpus`` writes as a user brings one (transcripts beside the recordings, one
without, a broken file, a silent one). The demo pipeline's run is the LoRA run checked here; an exact
resume and full fine-tuning start from its prepared data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from s2train.checkpoints import LoraSettings, add_lora, open_dual_ar
from s2train.training.lm_module import read_losses
from tests.conftest import DEMO_SHORT, kill_when, model_logits, read_jsonl, run_cli


@pytest.fixture(scope="module")
def lora_run(demo_root) -> Path:
    return demo_root / "demo" / "finetune"


@pytest.fixture(scope="module")
def sft(demo_root) -> Path:
    return demo_root / "demo" / "sft"


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _args(demo_root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "experiment=demo",
        "stage=finetune",
        f"run_root={demo_root}",
        f"run_dir={run_dir}",
        *DEMO_SHORT,
        *extra,
    ]


def test_bad_files_are_rejected_with_reasons_and_transcripts_come_from_beside_the_files(lora_run, demo_root):
    voice = demo_root / "demo" / "demo_corpus" / "voice"
    clean = lora_run / "clean"
    rejects = {r["source"]: (r["stage"], r["reason"]) for r in read_jsonl(clean / "rejects.jsonl")}
    assert rejects.pop("broken.wav") == ("decode", "unreadable")
    assert rejects.pop("silence.wav") == ("vad", "no_speech")
    # festival's diphones score near the personal DNSMOS floor of 2.5: a clip or two may fall under it
    assert len(rejects) <= 2 and all(why == ("quality", "low_dnsmos") for why in rejects.values())
    kept = {r["source"]: r for r in read_jsonl(clean / "manifest.jsonl")}
    recordings = sorted(p.name for p in voice.glob("ked-*.wav"))
    assert sorted(kept) == sorted(set(recordings) - set(rejects))
    assert all(r["speaker"] == "ked" for r in kept.values())
    sidecars = [*voice.glob("ked-*.txt"), *voice.glob("ked-*.lab")]
    transcripts = {p.with_suffix(".wav").name: p.read_text().strip() for p in sidecars}
    assert any(p.suffix == ".lab" for p in sidecars)
    untranscribed = set(recordings) - set(transcripts)
    assert len(untranscribed) == 1
    for name, row in kept.items():  # a .txt or .lab beside the file is its text; else the ASR's words
        assert row["text"] == transcripts.get(name, row["asr_text"])
    results = _results(lora_run)
    assert results["data"]["keep_rules"]["dnsmos_ovrl_min"] == 2.5  # the personal keep rules, reported
    assert results["data"]["rejected_by"] == {
        "decode:unreadable": 1,
        "vad:no_speech": 1,
        **({"quality:low_dnsmos": len(rejects)} if rejects else {}),
    }


def test_lora_trains_only_the_adapters(lora_run, sft):
    start = load_file(sft / "model.safetensors")
    state = torch.load(lora_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    lora = {k: v for k, v in state.items() if ".lora_" in k}
    frozen = {
        k.removeprefix("model.").replace(".base_layer", ""): v for k, v in state.items() if ".lora_" not in k
    }
    assert lora and set(frozen) == set(start)
    assert all(torch.equal(frozen[k], start[k]) for k in start)  # every weight as it started
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in lora.items())  # from 0
    assert any(".fast." in k for k in lora) and any(".slow." in k for k in lora)
    results = _results(lora_run)
    assert 0 < results["params_trained_M"] < 0.2 * (results["params_slow_M"] + results["params_fast_M"])
    merged = load_file(lora_run / "model.safetensors")
    assert set(merged) == set(start) and any(not torch.equal(merged[k], start[k]) for k in start)


def test_the_merged_model_computes_what_the_model_with_its_adapter_computes(lora_run, sft):
    adapted, _ = open_dual_ar(sft)
    note = json.loads((lora_run / "adapter" / "adapter.json").read_text())
    assert note["base"] == str(sft.resolve())
    add_lora(adapted, LoraSettings(**note["lora"]))
    state = torch.load(lora_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    adapted.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    merged, _ = open_dual_ar(lora_run)  # model.safetensors: the adapter merged
    from_adapter, _ = open_dual_ar(lora_run / "adapter")  # the SFT model + the adapter folder
    for model in (merged, from_adapter):
        for ours, theirs in zip(model_logits(model), model_logits(adapted.eval())):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    from s2train.runs import UMASK

    for written in (lora_run / "model.safetensors", *(lora_run / "adapter").iterdir()):
        assert written.stat().st_mode & 0o777 == 0o666 & ~UMASK, written  # colleagues can read them
    adapter_bytes = (lora_run / "adapter" / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < 0.3 * (lora_run / "model.safetensors").stat().st_size  # the adapter alone is small


def test_held_out_recordings_compare_the_start_with_the_finetuned_model(lora_run, demo_root, tmp_path):
    heldout = _results(lora_run)["heldout"]
    assert heldout["utterances"] == 6  # ked-s00 .. ked-s05
    for system in ("base_cloning", "finetuned", "finetuned_cloning"):
        assert heldout[f"{system}_wer"] >= 0 and -1 <= heldout[f"{system}_sim"] <= 1
        assert len(list((lora_run / "heldout" / "wav").glob(f"{system}-*.wav"))) == 6
    assert heldout["sim_gain"] == round(heldout["finetuned_sim"] - heldout["base_cloning_sim"], 4)
    assert (lora_run / "heldout" / "scores.png").stat().st_size > 10_000
    assert "held out of training" in (lora_run / "heldout" / "report.md").read_text()
    manifest = read_jsonl(lora_run / "clean" / "manifest.jsonl")
    held = {r["id"] for r in manifest if r["source"] < "ked-s06"}
    assert len(held) == 6 and heldout["reference"] not in held
    # synthesis opens the adapter folder like any model
    out = tmp_path / "synth"
    run_cli(
        "experiment=demo",
        "stage=synthesize",
        f"run_root={demo_root}",
        f"run_dir={out}",
        f"synthesize.model={lora_run / 'adapter'}",
        "synthesize.texts=[]",
        "synthesize.text=Please put the green box on the table near the window.",
        "synthesize.max_new_tokens=20",
        "synthesize.progress=false",
    )
    assert len(list((out / "wav").glob("*.wav"))) == 1


def _prepared_copy(lora_run: Path, run_dir: Path) -> None:
    """The finished clean and tokenize parts of ``lora_run``: a new run resumes them, nothing to redo."""
    run_dir.mkdir(parents=True)
    for part in ("clean", "tokenize"):
        shutil.copytree(lora_run / part, run_dir / part)


def test_a_killed_finetune_resumes_onto_the_uninterrupted_loss_curve(demo_root, lora_run, tmp_path):
    killed = tmp_path / "killed"
    _prepared_copy(lora_run, killed)
    # the pipeline's finetune run, on a copy of its prepared data, without speaking the held-out texts
    args = _args(demo_root, killed, "finetune.heldout_check=false")
    kill_when(args, (killed / "checkpoints" / "step-000003.ckpt").exists)  # last.ckpt may not be there yet
    assert len(read_losses(killed / "losses.jsonl")) < 6
    run_cli(*args)
    assert _results(killed)["resumed_from_step"] == 3
    assert read_losses(killed / "losses.jsonl") == read_losses(lora_run / "losses.jsonl")
    resumed, unbroken = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (killed, lora_run))
    assert set(resumed) == set(unbroken) and all(torch.equal(resumed[k], unbroken[k]) for k in unbroken)


def test_full_finetuning_can_keep_the_fast_model_and_give_the_voice_its_own_speaker(
    demo_root, lora_run, sft, tmp_path
):
    run_dir = tmp_path / "full"
    _prepared_copy(lora_run, run_dir)
    run_cli(
        *_args(demo_root, run_dir, "finetune.method=full", "finetune.freeze_fast=true", "finetune.speaker=2"),
        "finetune.heldout_check=false",
    )
    start, tuned = load_file(sft / "model.safetensors"), load_file(run_dir / "model.safetensors")
    fast = [k for k in start if k.startswith("fast.")]
    assert fast and all(torch.equal(tuned[k], start[k]) for k in fast)
    assert any(not torch.equal(tuned[k], start[k]) for k in start if k.startswith("slow."))
    assert not (run_dir / "adapter").exists()
    results = _results(run_dir)
    assert results["method"] == "full" and "heldout" not in results
    assert abs(results["params_trained_M"] - results["params_slow_M"]) < 1e-3  # the slow model alone


def test_bad_settings_are_refused_with_a_message(demo_root, lora_run, tmp_path):
    cases = [
        ("finetune.input=/nonexistent", "is not a folder", False),
        (f"finetune.init={tmp_path}", "is not a model", False),
        ("finetune.method=qlora", "must be lora or full", False),
        ("finetune.export_release=true", "fast_shared_embeddings", False),  # per-codebook fast heads
        ("finetune.speaker=9", "finetune.speaker=9", True),
        ("finetune.lora.target_modules=[*.nothing]", "matches no linear layer", True),
    ]
    for i, (override, message, prepared) in enumerate(cases):
        run_dir = tmp_path / f"case{i}"
        if prepared:
            _prepared_copy(lora_run, run_dir)
        proc = run_cli(*_args(demo_root, run_dir, override, "finetune.heldout_check=false"), check=False)
        assert proc.returncode == 2 and message in proc.stderr, (override, proc.stderr[-600:])
        assert not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("share, shards, repeats", [(0.5, 3, 1), (0.1, 1, 1), (0.9, 8, 3)])
def test_replay_takes_about_its_share_of_an_epoch(tmp_path, share, shards, repeats):
    from types import SimpleNamespace

    from s2train.training.finetune_stage import FinetuneConfig, replay_plan
    from tests.test_examples import write_rich_shards

    write_rich_shards(tmp_path / "corpus", n_shards=8, per_shard=10)
    stats = json.loads((tmp_path / "corpus" / "stats.json").read_text())
    (tmp_path / "corpus" / "stats.json").write_text(json.dumps({**stats, "utterances": 80}))
    voice = [tmp_path / "voice-0.tar", tmp_path / "voice-1.tar"]
    cfg = SimpleNamespace(
        seed=0, finetune=FinetuneConfig(replay=str(tmp_path / "corpus"), replay_share=share)
    )
    listed, plan = replay_plan(cfg, voice, voice_utterances=27)
    assert (plan["replay_shards"], plan["replay_repeats"]) == (shards, repeats)
    assert listed[:2] == voice and len(listed) == 2 + shards * repeats
    assert len(set(listed[2:])) == shards and all("corpus" in str(p) for p in listed[2:])
    replayed = plan["replay_utterances_per_epoch"]
    assert replayed == 10 * shards * repeats
    assert abs(replayed / (replayed + 27) - share) < 0.2  # to a shard: the corpus is dealt out by shard
    assert replay_plan(SimpleNamespace(seed=0, finetune=FinetuneConfig()), voice, 27) == (voice, {})


def test_a_released_model_finetunes_and_exports_back_to_the_released_layout(tmp_path, flite_wav):
    """From the released tiny S2 Pro folder and its codec: LoRA, the merged model, and release/ (its
    tokenizer copied from the release) that the compat loader reads back to the same logits."""
    import numpy as np
    import soundfile as sf

    fixtures = Path(__file__).resolve().parent / "fixtures" / "fish_s2"
    voice = tmp_path / "voice"
    voice.mkdir()
    texts = ["Please put the green box on the table.", "My brother likes to cook rice.", "We walked home."]
    for i, text in enumerate(texts):
        audio = np.concatenate(
            [np.zeros(4000, np.float32), flite_wav("slt", text), np.zeros(4000, np.float32)]
        )
        sf.write(voice / f"slt-{i}.wav", audio, 16000)
        (voice / f"slt-{i}.txt").write_text(text)
    run_dir = tmp_path / "run"
    run_cli(
        "stage=finetune",
        f"run_dir={run_dir}",
        f"finetune.input={voice}",
        f"finetune.init={fixtures / 'tiny_s2pro'}",
        f"finetune.codec={fixtures / 'tiny_codec'}",
        "finetune.export_release=true",
        "finetune.heldout=1",
        "finetune.heldout_check=false",
        "finetune.lora.r=2",
        "finetune.train.max_steps=3",
        "finetune.train.warmup_steps=1",
        "finetune.train.batch_size=2",
        "finetune.train.threads=1",
        "finetune.train.progress=false",
        "text.n_semantic=64",
        "text.n_speakers=2",
        "lm_data.max_len=512",
        "clean.progress=false",
        "tokenize.progress=false",
    )
    merged, tokenizer_folder = open_dual_ar(run_dir, residual_codebook_size=32)
    assert tokenizer_folder == run_dir  # the release's tokenizer travels with the merged model
    release, tokenizer_folder = open_dual_ar(run_dir / "release", residual_codebook_size=32)
    assert tokenizer_folder == run_dir / "release" and release.config == merged.config
    assert (run_dir / "release" / "tokenizer.json").read_bytes() == (
        fixtures / "tiny_s2pro" / "tokenizer.json"
    ).read_bytes()
    for ours, theirs in zip(model_logits(release), model_logits(merged)):
        assert torch.equal(ours, theirs)
    start, _ = open_dual_ar(fixtures / "tiny_s2pro", residual_codebook_size=32)
    assert any(not torch.equal(a, b) for a, b in zip(model_logits(merged), model_logits(start)))
