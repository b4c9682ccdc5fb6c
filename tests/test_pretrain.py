"""``stage=pretrain`` through the real CLI on token shards of the demo corpus: the loss falls, a killed run
resumes onto exactly the loss curve of an uninterrupted one, two-process gloo DDP trains, and every
shipped config composes and builds its model and data module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from s2train.models.dual_ar import DualAR, DualARConfig
from s2train.text.tokenizer import TextConfig, load_tokenizer
from s2train.training.lm_module import LMTrainConfig, parameter_groups, read_losses, warmup_cosine
from s2train.training.pretrain_stage import LMDataModule, codebook_sizes, fit_model_to_data
from tests.conftest import ROOT, compose_config, kill_when, run_cli

# Small and fast: 25 Hz tokens of the random tiny codec, 2 sequences of at most 1024 positions a step.
COMMON = [
    "stage=pretrain",
    "name=demo",
    "text.n_semantic=64",
    "lm_data.max_len=1024",
    "train.batch_size=2",
    "train.threads=1",
    "train.progress=false",
    "train.lr=3e-3",
    "train.warmup_steps=2",
]


def _pretrain(tokenized: Path, run_dir: Path, *overrides: str) -> dict:
    run_cli(*COMMON, f"lm_data.input={tokenized}", f"run_dir={run_dir}", *overrides)
    return json.loads((run_dir / "results.json").read_text())


def test_pretraining_lowers_the_loss_and_writes_curve_and_model(tokenized, tmp_path):
    results = _pretrain(tokenized, tmp_path / "run", "train.max_steps=24", "train.checkpoint_every=12")
    rows = read_losses(tmp_path / "run" / "losses.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert results["final_loss"] < 0.5 * results["first_loss"], results
    assert all(f"loss/codebook_{k}" in rows[-1] for k in range(4))
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 10_000
    # the model was fitted to this data: byte tokenizer + 64 semantic tokens, 4 codebooks of 64/32
    config = DualARConfig(**json.loads((tmp_path / "run" / "model.json").read_text()))
    assert (config.num_codebooks, config.codebook_size, config.residual_codebook_size) == (4, 64, 32)
    model = DualAR(config)
    model.load_state_dict(load_file(tmp_path / "run" / "model.safetensors"))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.ckpt")) == [
        "last.ckpt",
        "step-000012.ckpt",
        "step-000024.ckpt",
    ]


def test_killed_run_resumes_onto_the_uninterrupted_loss_curve(tokenized, tmp_path):
    steps = ["train.max_steps=12", "train.checkpoint_every=4"]
    _pretrain(tokenized, tmp_path / "whole", *steps)
    whole = read_losses(tmp_path / "whole" / "losses.jsonl")

    killed = tmp_path / "killed"
    ckpt = killed / "checkpoints" / "step-000008.ckpt"
    kill_when([*COMMON, f"lm_data.input={tokenized}", f"run_dir={killed}", *steps], ckpt.exists)
    assert len(read_losses(killed / "losses.jsonl")) < 12

    results = _pretrain(tokenized, killed, *steps)
    assert results["resumed_from_step"] in (4, 8)
    assert read_losses(killed / "losses.jsonl") == whole  # bit for bit, every step


def test_two_process_gloo_ddp_trains(tokenized, tmp_path):
    run_dir = tmp_path / "ddp"
    results = _pretrain(
        tokenized,
        run_dir,
        "train.max_steps=3",
        "train.batch_size=1",
        "train.devices=2",
        "train.accelerator=cpu",
        "strategy.process_group_backend=gloo",
    )
    assert results["steps"] == 3
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    streams = checkpoint["token_streams"]
    assert len(streams) == 2  # each rank's data cursor
    consumed = [sum(c[1] for c in s["readers"].values()) for s in streams]
    assert consumed == [3, 3]
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in read_losses(run_dir / "losses.jsonl"))


def test_a_resume_with_another_world_size_is_refused(tokenized, tmp_path):
    run_dir = tmp_path / "run"
    _pretrain(tokenized, run_dir, "train.max_steps=3", "train.batch_size=1")
    proc = run_cli(
        *COMMON,
        f"lm_data.input={tokenized}",
        f"run_dir={run_dir}",
        "train.max_steps=6",
        "train.batch_size=1",
        "train.devices=2",
        "train.accelerator=cpu",
        check=False,
    )
    assert proc.returncode != 0
    assert "written by 1 ranks and this run has 2" in proc.stderr


def test_model_is_fitted_to_the_tokenizer_and_codec(tokenized):
    tokenizer = load_tokenizer(TextConfig(n_semantic=256))
    from s2train.models.dual_ar import tiny

    config, changed = fit_model_to_data(tiny(), tokenizer, [256] + [128] * 7)
    assert (config.num_codebooks, config.codebook_size, config.residual_codebook_size) == (8, 256, 128)
    assert config.vocab_size % 64 == 0 and config.vocab_size >= tokenizer.vocab_size
    assert config.semantic_begin_id == tokenizer.semantic_begin
    assert set(changed) >= {"num_codebooks", "codebook_size"}
    with pytest.raises(ValueError, match="text.n_semantic=1024"):
        fit_model_to_data(tiny(), tokenizer, [1024] * 10)
    # lm_data.codebooks: token shards' sizes are cut to it; data without sizes takes it as the count
    assert codebook_sizes(str(tokenized), 2) == codebook_sizes(str(tokenized))[:2]
    with pytest.raises(ValueError, match="lm_data.codebooks=99"):
        codebook_sizes(str(tokenized), 99)
    assert fit_model_to_data(tiny(), tokenizer, None, codebooks=3)[0].num_codebooks == 3
    assert fit_model_to_data(tiny(), tokenizer, None)[0].num_codebooks == tiny().num_codebooks


def test_schedule_and_weight_decay_groups():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    from s2train.models.dual_ar import tiny

    model = DualAR(tiny())
    decay, no_decay = parameter_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"])
    embedding = model.slow.embeddings.weight
    assert any(p is embedding for p in no_decay["params"])
    assert not any(p is embedding for p in decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )
    with pytest.raises(ValueError, match="warmup_steps"):
        LMTrainConfig(max_steps=10, warmup_steps=10)


def test_input_noise_replaces_frame_codes_at_the_given_rates_and_never_text():
    from s2train.models.dual_ar import tiny
    from s2train.training.lm_module import noisy_inputs

    cfg = tiny()
    B, K, T = 4, cfg.num_codebooks, 600
    inputs = torch.zeros(B, 1 + K, T, dtype=torch.long)
    semantic = torch.arange(T) % 3 != 0  # a third of the positions are text
    codes = torch.randint(0, cfg.residual_codebook_size, (B, K, T))
    inputs[:, 0] = torch.where(semantic, cfg.semantic_begin_id + codes[:, 0], 7)
    inputs[:, 1:] = torch.where(semantic, codes, 0)
    noisy = noisy_inputs(inputs, cfg, 0.4, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(noisy[:, :2], inputs[:, :2])  # no semantic noise: the token and c0 rows stay
    assert torch.equal(noisy[..., ~semantic], inputs[..., ~semantic])  # text positions never change
    changed = (noisy[:, 2:, semantic] != inputs[:, 2:, semantic]).float().mean().item()
    # a replaced code equals the old one by chance 1 / codebook_size of the time
    assert changed == pytest.approx(0.4 * (1 - 1 / cfg.residual_codebook_size), abs=0.02)
    assert int(noisy[:, 2:].max()) < cfg.residual_codebook_size

    both = noisy_inputs(inputs, cfg, 0.0, 0.25, torch.Generator().manual_seed(1))
    assert torch.equal(both[:, 2:], inputs[:, 2:])
    assert torch.equal(both[..., ~semantic], inputs[..., ~semantic])
    hit = both[:, 0, semantic] != inputs[:, 0, semantic]
    assert hit.float().mean().item() == pytest.approx(0.25 * (1 - 1 / cfg.codebook_size), abs=0.02)
    # a replaced token is a semantic token and its c0 row says the same code
    assert torch.equal(both[:, 0, semantic] - cfg.semantic_begin_id, both[:, 1, semantic])
    assert bool(cfg.is_semantic(both[:, 0, semantic]).all())

    again = noisy_inputs(inputs, cfg, 0.4, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(again, noisy_inputs(inputs, cfg, 0.4, 0.25, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="code_noise"):
        LMTrainConfig(code_noise=1.0)
    with pytest.raises(ValueError, match="semantic_noise"):
        LMTrainConfig(semantic_noise=-0.1)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_every_shipped_experiment_composes_and_builds_its_model_and_data(experiment, tokenized):
    cfg = compose_config(f"experiment={experiment}", f"lm_data.input={tokenized}", "text.n_semantic=64")
    tokenizer = load_tokenizer(cfg.text)
    model_cfg, _ = fit_model_to_data(cfg.model, tokenizer, [64, 32, 32, 32])
    with torch.device("meta"):
        model = DualAR(model_cfg)
    assert sum(p.numel() for p in model.parameters()) > 0
    data = LMDataModule(cfg, tokenizer, model_cfg.num_codebooks, None, cfg.lm_data, cfg.train)
    assert data.num_codebooks == 4


@pytest.mark.parametrize("model", ["tiny", "small", "s2pro"])
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero2", "deepspeed_zero3"])
def test_every_model_and_strategy_preset_composes(model, strategy):
    cfg = compose_config("stage=pretrain", f"model={model}", f"strategy={strategy}")
    assert cfg.strategy.name == strategy
    with torch.device("meta"):
        built = DualAR(cfg.model)
    slow = sum(p.numel() for p in built.slow.parameters())
    fast = sum(p.numel() for p in built.fast.parameters())
    if model == "s2pro":
        print(f"s2pro: {slow / 1e9:.3f}B slow + {fast / 1e9:.3f}B fast parameters")
        assert 4.0e9 < slow < 4.2e9 and 0.38e9 < fast < 0.45e9


def test_deepspeed_without_deepspeed_says_what_to_install(tokenized, tmp_path):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here, so there is no missing-package message to check")
    proc = run_cli(
        *COMMON, f"lm_data.input={tokenized}", f"run_dir={tmp_path}", "strategy=deepspeed_zero2", check=False
    )
    assert proc.returncode == 2 and "pip install -e .[deepspeed]" in proc.stderr
