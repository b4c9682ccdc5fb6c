"""``stage=preference`` and ``stage=grpo`` through the real CLI on the demo's models: the preference model
tells clean from degraded audio, a killed GRPO run resumes onto the same curve, prompts come from a JSONL
whose clips must lie beside it, and what cannot work is refused with a sentence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from data_pipeline.demo_corpus import synthesize
from s2train.rl.grpo_stage import prompts_from_data
from s2train.rl.preference import PreferenceScorer, degrade, read_pairs
from s2train.training.lm_data import open_token_source
from s2train.training.pretrain_stage import token_input
from tests.conftest import compose_config, kill_when, read_jsonl, run_cli

TIMING = ("rollout_s", "score_s", "update_s")


def _grpo_args(demo_root, run_dir, *extra: str) -> list[str]:
    return [
        "experiment=demo",
        "stage=grpo",
        f"run_root={demo_root}",
        f"run_dir={run_dir}",
        "grpo.train.progress=false",
        "grpo.prompts_per_step=2",
        "grpo.group_size=3",
        "grpo.heldout_prompts=2",
        "grpo.eval_samples=2",
        "grpo.max_new_tokens=40",
        "grpo.long_prompts=true",  # every demo utterance is longer than 40 frames
        "grpo.train.threads=1",
        *extra,
    ]


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_the_preference_model_scores_clean_speech_above_its_degraded_copies(demo_root, tmp_path):
    run_cli(
        "experiment=demo",
        "stage=preference",
        f"run_root={demo_root}",
        f"run_dir={tmp_path}",
        "preference.max_steps=150",
        "preference.progress=false",
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["pairs"] == 4 * (results["pairs"] // 4)  # every clip with each of the four degradations
    assert results["heldout_pairs"] >= 8 and results["heldout_accuracy"] >= 0.8, results
    assert (tmp_path / "loss_curve.png").is_file()
    scorer = PreferenceScorer.open(tmp_path)
    clean = synthesize("rms", "The library opened at nine and closes only on Fridays.", 16000)
    rng = np.random.default_rng(0)
    worse = [degrade(clean, kind, rng) for kind in ("noise", "clipping", "stretch")]
    scores = scorer.score([clean, *worse])
    assert (scores[0] > scores[1:]).all(), scores


def test_preference_pairs_must_lie_beside_their_file(tmp_path):
    wav = synthesize("awb", "One two three.", 16000)
    sf.write(tmp_path / "a.wav", wav, 16000)
    sf.write(tmp_path / "b.wav", 0.1 * wav, 16000)
    good = tmp_path / "pairs.jsonl"
    good.write_text(json.dumps({"a": "a.wav", "b": "b.wav", "preferred": "b"}) + "\n")
    [(a, b, preferred, _)] = read_pairs(str(good))
    assert preferred == 1 and np.allclose(b, 0.1 * a, atol=1e-3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"a": "../../etc/passwd", "b": "b.wav", "preferred": "a"}) + "\n")
    with pytest.raises(ValueError, match="outside"):
        read_pairs(str(bad))
    bad.write_text('{"a": "a.wav", "preferred": "c"}\n')
    with pytest.raises(ValueError, match="line 1"):
        read_pairs(str(bad))


def test_a_killed_grpo_run_resumes_onto_the_uninterrupted_curve(demo_root, tmp_path):
    steps = [
        "grpo.train.max_steps=4",
        "grpo.train.checkpoint_every=2",
        "grpo.eval_every=2",
        # the shortened demo's model says little in 40 frames: every guard would zero every reward,
        # leaving nothing to learn from; without them the candidates' rewards differ
        "grpo.guards.enabled=[]",
    ]
    run_cli(*_grpo_args(demo_root, tmp_path / "whole", *steps))
    whole = read_jsonl(tmp_path / "whole" / "metrics.jsonl")
    assert [r["step"] for r in whole] == [1, 2, 3, 4]
    assert all(r["logprob_gap"] < 1e-4 for r in whole)  # the rollouts' log-probs are the trainer's
    assert any(r["kl"] > 0 for r in whole[1:])  # the policy moved away from the frozen start
    killed = tmp_path / "killed"
    kill_when(_grpo_args(demo_root, killed, *steps), (killed / "checkpoints" / "last.ckpt").exists)
    run_cli(*_grpo_args(demo_root, killed, *steps))
    results = json.loads((killed / "results.json").read_text())
    assert results["resumed_from_step"] == 2 and results["steps"] == 4
    assert _untimed(read_jsonl(killed / "metrics.jsonl")) == _untimed(whole)
    assert read_jsonl(killed / "heldout.jsonl") == read_jsonl(tmp_path / "whole" / "heldout.jsonl")
    assert results["heldout_evaluations"] == 3  # before, after step 2, after step 4


def test_grpo_prompts_from_the_token_data_leave_out_utterances_longer_than_the_budget(demo_root):
    cfg = compose_config("experiment=demo", f"run_root={demo_root}")
    source = open_token_source(token_input(cfg), cfg.lm_data.hf_rows_per_unit)
    frames = {
        u.key: u.codes.shape[-1]
        for unit in range(source.n_units)
        for u in source.read_unit(unit)
        if u.text.strip() and u.lang in (None, "en", "zh")
    }
    budget = int(np.median(list(frames.values())))  # about half the utterances are longer
    cfg.grpo.max_new_tokens = budget
    kept = {p.key for p in prompts_from_data(cfg, cfg.grpo)}
    assert kept == {k for k, n in frames.items() if n <= budget}
    assert 0 < len(kept) < len(frames)
    cfg.grpo.long_prompts = True
    assert {p.key for p in prompts_from_data(cfg, cfg.grpo)} == set(frames)


def test_grpo_prompts_from_a_jsonl_with_a_cloned_voice_and_a_caption(demo_root, tmp_path):
    clips = tmp_path / "prompts"
    clips.mkdir()
    voice = synthesize("slt", "She found our keys under the blue chair.", 16000)
    sf.write(clips / "slt.wav", voice, 16000)
    rows = [
        {
            "id": f"p{i}",
            "text": text,
            "reference_audio": "slt.wav",
            "reference_text": "She found our keys under the blue chair.",
        }
        for i, text in enumerate(
            [
                "The morning train was late again.",
                "Please put the green box down.",
                "It started to rain.",
                "We need more paper.",
            ]
        )
    ]
    rows.append({"id": "c", "text": "A cold wind came down.", "caption": "A female speaker at a slow pace."})
    (clips / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_cli(
        *_grpo_args(
            demo_root,
            tmp_path / "run",
            "grpo.train.max_steps=1",
            f"grpo.prompts={clips / 'prompts.jsonl'}",
            "grpo.rewards.weights={sim: 1.0, instruction: 0.5}",
        )
    )
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["train_prompts"] + results["heldout_prompts"] == 5
    held = read_jsonl(tmp_path / "run" / "heldout.jsonl")
    assert all(r["raw_sim"] is None or -1 <= r["raw_sim"] <= 1 for r in held)
    (tmp_path / "other").mkdir()
    outside = tmp_path / "other" / "elsewhere.jsonl"  # its clip lies in another folder
    outside.write_text(
        json.dumps({"text": "Hi.", "reference_audio": str(clips / "slt.wav"), "reference_text": "x"}) + "\n"
    )
    failed = run_cli(*_grpo_args(demo_root, tmp_path / "bad", f"grpo.prompts={outside}"), check=False)
    assert failed.returncode != 0 and "allowed folders" in failed.stderr


def test_grpo_refuses_zero3_and_settings_that_cannot_work(demo_root, tmp_path):
    failed = run_cli(*_grpo_args(demo_root, tmp_path / "a", "strategy=deepspeed_zero3"), check=False)
    assert failed.returncode != 0 and "ZeRO-3" in failed.stderr
    failed = run_cli(*_grpo_args(demo_root, tmp_path / "b", "grpo.group_size=1"), check=False)
    assert failed.returncode != 0 and "group_size must be at least 2" in failed.stderr


def test_every_preference_encoder_loads_from_its_local_format(codec_file, tmp_path):
    """The codec's encoder, WavLM from a SIM checkpoint and whisper's encoder, each from a tiny random file
    in its real on-disk format: pooled features of the clip's length, and a scorer that reopens them."""
    import dataclasses

    import torch
    from safetensors.torch import save_file
    from whisper.model import ModelDimensions, Whisper

    from s2train.judges.sim_wavlm import TINY_ARCH, build_sim_model, save_checkpoint
    from s2train.rl.preference import FrameEncoder, Scorer

    torch.manual_seed(0)
    wavlm = tmp_path / "wavlm_large_finetune.pth"
    save_checkpoint(build_sim_model(**TINY_ARCH).state_dict(), wavlm)
    dims = ModelDimensions(80, 1500, 32, 2, 1, 51865, 64, 32, 2, 1)
    model = Whisper(dims)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
    whisper_pt = tmp_path / "tiny.pt"
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": model.state_dict()}, whisper_pt)
    rng = np.random.default_rng(0)
    clips = [
        0.1 * rng.standard_normal(16000).astype(np.float32),
        0.1 * rng.standard_normal(24000).astype(np.float32),
    ]
    for kind, path in (("codec", codec_file), ("wavlm", wavlm), ("whisper", whisper_pt)):
        encoder = FrameEncoder(kind, str(path))
        features = encoder.features(clips)
        assert features.shape[0] == 2 and torch.isfinite(features).all(), kind
        assert not torch.allclose(features[0], features[1]), kind
        folder = tmp_path / kind
        folder.mkdir()
        scorer = Scorer(features.shape[1], 8)
        save_file(scorer.state_dict(), str(folder / "preference.safetensors"))
        info = {"encoder": kind, "encoder_path": str(path), "dim": features.shape[1], "hidden": 8}
        (folder / "preference.json").write_text(json.dumps(info))
        expected = scorer(features).detach().numpy()
        np.testing.assert_allclose(PreferenceScorer.open(folder).score(clips), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="wavlm_large_finetune.pth"):
        FrameEncoder("wavlm", str(tmp_path / "missing.pth"))
