"""``stage=finetune``: a folder of one voice's recordings (transcripts beside them, one without, a broken
file, a silent one) through the clean judges and the codec into LoRA or full fine-tuning on the shared
trainer; the adapter alone and the merged model, both opened by synthesis; an exact resume; the export
to the released layout; and the before/after check on held-out recordings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from s2train.checkpoints import add_lora, open_dual_ar
from s2train.training.lm_module import read_losses
from tests.conftest import kill_when, read_jsonl, run_cli

SENTENCES = [
    "Please put the green box on the table near the window.",
    "My brother likes to cook rice and beans on Sunday evenings.",
    "The morning train was late again, so we walked to the office.",
    "She opened the door and the cat ran out into the garden.",
    "We will meet at the library after lunch tomorrow.",
]
STEPS = [
    "finetune.train.max_steps=6",
    "finetune.train.checkpoint_every=3",
    "finetune.train.batch_size=2",
    "finetune.train.warmup_steps=2",
    "finetune.train.lr=3e-3",
    "finetune.train.threads=1",
    "finetune.train.progress=false",
]


def finetune_args(voice: Path, init: Path, codec: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "stage=finetune",
        f"finetune.input={voice}",
        f"finetune.init={init}",
        f"finetune.codec={codec}",
        f"run_dir={run_dir}",
        "finetune.voice=rms",
        "finetune.heldout_sources=[rms-4.wav]",
        "finetune.lora.r=4",
        "text.n_semantic=64",
        "lm_data.max_len=512",
        "clean.sample_rate=16000",
        "clean.progress=false",
        "tokenize.progress=false",
        "synthesize.max_new_tokens=20",
        "synthesize.progress=false",
        *STEPS,
        *extra,
    ]


@pytest.fixture(scope="module")
def voice(tmp_path_factory, flite_wav) -> Path:
    """Five sentences of flite's rms with transcripts beside four of them, a broken file, a silent one."""
    folder = tmp_path_factory.mktemp("voice")
    pad = np.zeros(4000, np.float32)
    for i, text in enumerate(SENTENCES):
        sf.write(folder / f"rms-{i}.wav", np.concatenate([pad, flite_wav("rms", text), pad]), 16000)
        if i != 3:
            (folder / f"rms-{i}.{'lab' if i == 2 else 'txt'}").write_text(text + "\n")
    (folder / "broken.wav").write_bytes(b"RIFF but not audio")
    sf.write(folder / "silence.wav", np.zeros(32000, np.float32), 16000)
    return folder


@pytest.fixture(scope="module")
def base(tiny_token_run, tmp_path_factory) -> Path:
    """A tiny model pretrained a few steps on tokens of the tiny codec's shape (1 x 64 + 3 x 32 codes)."""
    run_dir = tmp_path_factory.mktemp("base")
    run_cli(
        "stage=pretrain",
        f"lm_data.input={tiny_token_run}",
        f"run_dir={run_dir}",
        "text.n_semantic=64",
        "train.max_steps=4",
        "train.warmup_steps=1",
        "train.batch_size=2",
        "train.threads=1",
        "train.progress=false",
    )
    return run_dir


@pytest.fixture(scope="module")
def lora_run(voice, base, codec_file, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finetune") / "run"
    run_cli(*finetune_args(voice, base, codec_file, run_dir, "finetune.export_release=true"))
    return run_dir


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _logits(model, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow logits of a random batch and fast logits teacher-forced on its first 6 positions."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    T = 12
    tokens = torch.randint(0, 256, (1, 1, T), generator=g)
    codes = torch.randint(0, cfg.residual_codebook_size, (1, cfg.num_codebooks, T), generator=g)
    inputs = torch.cat([tokens, codes], dim=1)
    inputs[0, 0, 6:] = cfg.semantic_begin_id + inputs[0, 1, 6:] % cfg.codebook_size
    with torch.no_grad():
        out = model(inputs, torch.arange(T)[None], torch.zeros(1, T, dtype=torch.long))
        fast = model.fast_forward(out.hidden[0, :6], codes[0, :, :6].T)
    return out.logits, fast


def test_bad_files_are_rejected_with_reasons_and_transcripts_come_from_beside_the_files(lora_run, voice):
    clean = lora_run / "clean"
    rejects = {r["source"]: (r["stage"], r["reason"]) for r in read_jsonl(clean / "rejects.jsonl")}
    assert rejects["broken.wav"] == ("decode", "unreadable")
    assert rejects["silence.wav"] == ("vad", "no_speech")
    kept = {r["source"]: r for r in read_jsonl(clean / "manifest.jsonl")}
    assert set(kept) == {f"rms-{i}.wav" for i in range(5)}
    assert all(r["speaker"] == "rms" for r in kept.values())  # one voice: references come from all of them
    for i in (0, 1, 2, 4):  # .txt and .lab transcripts are the text; the ASR's words are kept beside
        assert kept[f"rms-{i}.wav"]["text"] == SENTENCES[i]
    assert kept["rms-3.wav"]["text"] == kept["rms-3.wav"]["asr_text"] != SENTENCES[3]  # no transcript: ASR
    results = _results(lora_run)
    assert results["data"]["keep_rules"]["dnsmos_ovrl_min"] == 2.5  # the personal keep rules, reported
    assert results["data"]["rejected_by"] == {"decode:unreadable": 1, "vad:no_speech": 1}


def test_lora_trains_only_the_adapters(lora_run, base):
    start = load_file(base / "model.safetensors")
    state = torch.load(lora_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    lora = {k: v for k, v in state.items() if ".lora_" in k}
    frozen = {
        k.removeprefix("model.").replace(".base_layer", ""): v for k, v in state.items() if ".lora_" not in k
    }
    assert lora and set(frozen) == set(start)
    assert all(torch.equal(frozen[k], start[k]) for k in start)  # every weight of the model as it started
    assert any(
        k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in lora.items()
    )  # B starts at 0
    assert any(".fast." in k for k in lora) and any(".slow." in k for k in lora)
    results = _results(lora_run)
    assert 0 < results["params_trained_M"] < 0.2 * (results["params_slow_M"] + results["params_fast_M"])
    assert results["final_loss"] < results["first_loss"]
    merged = load_file(lora_run / "model.safetensors")
    assert set(merged) == set(start) and any(not torch.equal(merged[k], start[k]) for k in start)


def test_the_merged_model_computes_what_the_model_with_its_adapter_computes(lora_run, base):
    adapted, _ = open_dual_ar(base)
    add_lora(adapted, json_settings(lora_run))
    state = torch.load(lora_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    adapted.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    merged, _ = open_dual_ar(lora_run)  # model.safetensors: the adapter merged
    from_adapter, _ = open_dual_ar(lora_run / "adapter")  # the base model + the adapter folder
    for model in (merged, from_adapter):
        for ours, theirs in zip(_logits(model), _logits(adapted.eval())):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    adapter_bytes = (lora_run / "adapter" / "adapter_model.safetensors").stat().st_size
    assert (
        adapter_bytes < 0.35 * (lora_run / "model.safetensors").stat().st_size
    )  # the adapter alone is small


def json_settings(run_dir: Path):
    from s2train.checkpoints import LoraSettings

    return LoraSettings(**json.loads((run_dir / "adapter" / "adapter.json").read_text())["lora"])


def test_the_release_export_loads_through_compat_to_the_same_logits(lora_run):
    release = _results(lora_run)["release"]
    assert {p.name for p in Path(release).iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    merged, _ = open_dual_ar(lora_run)
    exported, tokenizer_folder = open_dual_ar(
        release, residual_codebook_size=merged.config.residual_codebook_size
    )
    assert tokenizer_folder == Path(release) and exported.config == merged.config
    for ours, theirs in zip(_logits(exported), _logits(merged)):
        assert torch.equal(ours, theirs)


def test_heldout_recordings_compare_the_start_with_the_finetuned_model(lora_run, tmp_path, codec_file):
    heldout = _results(lora_run)["heldout"]
    assert heldout["utterances"] == 1
    for system in ("base_cloning", "finetuned", "finetuned_cloning"):
        assert 0 <= heldout[f"{system}_wer"] and -1 <= heldout[f"{system}_sim"] <= 1
        assert (lora_run / "heldout" / "wav" / f"{system}-000.wav").is_file()
    assert heldout["sim_gain"] == round(heldout["finetuned_sim"] - heldout["base_cloning_sim"], 4)
    assert (lora_run / "heldout" / "scores.png").stat().st_size > 10_000
    assert "held out of training" in (lora_run / "heldout" / "report.md").read_text()
    # the held-out recording was never trained on: its text is in no training batch's utterance keys
    held = [r["id"] for r in read_jsonl(lora_run / "clean" / "manifest.jsonl") if r["source"] == "rms-4.wav"]
    assert held and heldout["reference"] not in held
    # synthesis takes the adapter folder like any model
    out = tmp_path / "synth"
    run_cli(
        "stage=synthesize",
        f"run_dir={out}",
        f"synthesize.model={lora_run / 'adapter'}",
        f"synthesize.codec={codec_file}",
        "synthesize.text=Hello there.",
        "synthesize.max_new_tokens=12",
        "synthesize.progress=false",
        "text.n_semantic=64",
    )
    assert len(list((out / "wav").glob("*.wav"))) == 1


def _prepared_copy(lora_run: Path, run_dir: Path) -> None:
    """The finished clean and tokenize parts of ``lora_run``: the new run resumes them (nothing to redo)."""
    run_dir.mkdir(parents=True)
    for part in ("clean", "tokenize"):
        shutil.copytree(lora_run / part, run_dir / part)


def test_a_killed_finetune_resumes_onto_the_uninterrupted_loss_curve(
    voice, base, codec_file, lora_run, tmp_path
):
    killed = tmp_path / "killed"
    _prepared_copy(lora_run, killed)
    args = finetune_args(voice, base, codec_file, killed, "finetune.export_release=true")
    kill_when(args, (killed / "checkpoints" / "step-000003.ckpt").exists)
    assert len(read_losses(killed / "losses.jsonl")) < 6
    run_cli(*args)
    results = _results(killed)
    assert results["resumed_from_step"] == 3
    assert read_losses(killed / "losses.jsonl") == read_losses(lora_run / "losses.jsonl")
    resumed, whole = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (killed, lora_run))
    assert set(resumed) == set(whole) and all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_full_finetuning_can_keep_the_fast_model_and_give_the_voice_its_own_speaker(
    voice, base, codec_file, lora_run, tmp_path
):
    run_dir = tmp_path / "full"
    _prepared_copy(lora_run, run_dir)
    run_cli(
        *finetune_args(
            voice,
            base,
            codec_file,
            run_dir,
            "finetune.method=full",
            "finetune.freeze_fast=true",
            "finetune.speaker=2",
        )
    )
    start, tuned = load_file(base / "model.safetensors"), load_file(run_dir / "model.safetensors")
    fast = [k for k in start if k.startswith("fast.")]
    assert fast and all(torch.equal(tuned[k], start[k]) for k in fast)
    assert any(not torch.equal(tuned[k], start[k]) for k in start if k.startswith("slow."))
    assert not (run_dir / "adapter").exists()
    results = _results(run_dir)
    assert results["method"] == "full" and results["heldout"]["utterances"] == 1


def test_bad_settings_are_refused_with_a_message(voice, base, codec_file, tmp_path):
    cases = [
        ("finetune.input=/nonexistent", "is not a folder"),
        (f"finetune.init={tmp_path}", "is not a model"),
        ("finetune.method=qlora", "must be lora or full"),
        ("finetune.lora.target_modules=[*.nothing]", "matches no linear layer"),
    ]
    for override, message in cases:
        run_dir = tmp_path / f"x{len(message)}"
        proc = run_cli(*finetune_args(voice, base, codec_file, run_dir), override, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (override, proc.stderr[-600:])
