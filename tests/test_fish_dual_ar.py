"""Parity with upstream fish-speech on the tiny S2 Pro fixture (``tests/fixtures/fish_s2``, README
sections 1 and 2): loading, RoPE tables, both embedding paths, the fast model, the padded training batch
and its loss, and greedy generation in the official chat format. Tolerances are the README's (2.f)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from s2train.compat.fish_dual_ar import load_fish_dual_ar, official_to_ours
from s2train.inference.naive import generate_naive
from s2train.inference.sampling import SamplingParams
from s2train.models.dual_ar import DualAR
from s2train.models.layers import rope_cos_sin
from s2train.training.dual_ar_loss import dual_ar_loss, select_fast_rows
from tests.conftest import model_logits

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "fish_s2"  # released S2 Pro formats, tiny weights
SINGLE, SHARDED = FIXTURES / "tiny_s2pro", FIXTURES / "tiny_s2pro_sharded"
REFS = FIXTURES / "dualar_refs.safetensors"


LOGITS = dict(atol=5e-5, rtol=0)  # README 2.f: logits atol 5e-5
HIDDEN = dict(atol=1e-5, rtol=0)  # hidden states and embeddings atol 1e-5


@pytest.fixture(scope="module")
def refs() -> dict[str, torch.Tensor]:
    return load_file(REFS)


@pytest.fixture(scope="module")
def loaded():
    return load_fish_dual_ar(SINGLE)


@pytest.fixture(scope="module")
def model(loaded) -> DualAR:
    return loaded[0]


@pytest.fixture(scope="module")
def train_model(model) -> DualAR:
    """The same weights with upstream's training-path embedding (no sqrt(K + 1) scaling)."""
    unscaled = DualAR(dataclasses.replace(model.config, scale_codebook_embeddings=False))
    unscaled.load_state_dict(model.state_dict())
    return unscaled.eval()


# ------------------------------------------------------------------------------------------- loading


def test_both_release_layouts_load_to_the_same_model(loaded):
    model, info = loaded
    sharded, sharded_info = load_fish_dual_ar(SHARDED)
    cfg = model.config
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (
        344,
        64,
        2,
        4,
        2,
        16,
    )
    assert (cfg.fast_n_layers, cfg.num_codebooks, cfg.codebook_size, cfg.residual_codebook_size) == (
        3,
        10,
        64,
        64,
    )
    assert cfg.qk_norm and not cfg.fast_qk_norm and cfg.tie_embeddings and cfg.scale_codebook_embeddings
    assert cfg.rope_base == 1e6 and cfg.norm_eps == 1e-6 and cfg.rope_table_dtype == "bfloat16"
    assert (info.semantic_begin_id, info.semantic_end_id, info.semantic_ids_from) == (272, 335, "tokenizer")
    assert (info.im_end_id, info.pad_id, info.weight_files) == (258, 259, ("model.safetensors",))
    assert sharded_info.weight_files == (
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    )
    assert not model.training and model.slow.embeddings.weight.dtype == torch.float32
    ours, theirs = model.state_dict(), sharded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_every_official_tensor_lands_bit_for_bit(model):
    official = load_file(SINGLE / "model.safetensors")
    ours = model.state_dict()
    assert len(official) == len(ours) == 45
    for key, value in official.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(ours[official_to_ours(key)], value.float()), key
    bf16, _ = load_fish_dual_ar(SINGLE, dtype=torch.bfloat16)
    assert bf16.fast.output.weight.dtype == torch.bfloat16


def write_release(
    tmp_path: Path, state: dict[str, torch.Tensor], tokenizer: bool = True, **config_changes
) -> Path:
    folder = tmp_path / "release"
    folder.mkdir()
    config = json.loads((SINGLE / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    if tokenizer:
        shutil.copy(SINGLE / "tokenizer.json", folder / "tokenizer.json")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_strict_loading_names_missing_unexpected_and_misshaped_keys(tmp_path):
    official = load_file(SINGLE / "model.safetensors")
    broken = dict(official)
    del broken["text_model.model.layers.1.attention.q_norm.weight"]
    broken["audio_decoder.layers.0.attention.bias"] = torch.zeros(3)
    broken["audio_decoder.output.weight"] = torch.zeros(65, 64)
    with pytest.raises(ValueError) as error:
        load_fish_dual_ar(write_release(tmp_path, broken))
    message = str(error.value)
    assert "slow.layers.1.attention.q_norm.weight" in message
    assert "fast.layers.0.attention.bias" in message
    assert "fast.output.weight (65, 64) (expected (64, 64))" in message


def test_folders_that_are_not_a_release_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_fish_dual_ar(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dual_ar"}))
    with pytest.raises(ValueError, match="not 'fish_qwen3_omni'"):
        load_fish_dual_ar(tmp_path)
    official = load_file(SINGLE / "model.safetensors")
    folder = write_release(tmp_path, official)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="neither model.safetensors nor"):
        load_fish_dual_ar(folder)


def test_semantic_ids_fall_back_to_the_config_without_a_tokenizer(tmp_path):
    official = load_file(SINGLE / "model.safetensors")
    folder = write_release(tmp_path, official, tokenizer=False)
    model, info = load_fish_dual_ar(folder)
    assert (info.semantic_begin_id, info.semantic_end_id, info.semantic_ids_from) == (272, 335, "config")
    assert info.im_end_id == 258  # config eos_token_id
    masked, _ = load_fish_dual_ar(SINGLE, residual_codebook_size=16)
    assert masked.config.residual_codebook_size == 16


# ------------------------------------------------------------------------------------- slow model


def test_rope_tables_are_the_bf16_rounded_upstream_tables(refs):
    cos, sin = rope_cos_sin(torch.arange(256), 16, 1e6, torch.bfloat16)
    assert torch.equal(torch.stack([cos, sin], dim=-1), refs["rope.slow_freqs_cis_first256"])
    cos, sin = rope_cos_sin(torch.arange(10), 16, 1e6, torch.bfloat16)
    assert torch.equal(torch.stack([cos, sin], dim=-1), refs["rope.fast_freqs_cis"])
    assert cos[1, 0].item() == 0.5390625
    cos32, _ = rope_cos_sin(torch.arange(2), 16, 1e6, torch.float32)
    assert abs(cos32[1, 0].item() - 0.5403023) < 1e-6  # the float32 table differs, as the README warns


def run_with_prenorm(model: DualAR, tokens: torch.Tensor):
    captured = {}
    handle = model.slow.norm.register_forward_pre_hook(lambda _, args: captured.update(x=args[0]))
    with torch.no_grad():
        out = model(tokens)
    handle.remove()
    return out, captured["x"]


@pytest.mark.parametrize("path", ["infer", "train"])
def test_slow_model_reproduces_upstream(refs, model, train_model, path):
    net = model if path == "infer" else train_model  # scaled (forward_generate) or unscaled (forward)
    inp = refs["a.inp"]
    with torch.no_grad():
        torch.testing.assert_close(net.slow.embed(inp), refs[f"b.{path}.embeddings"], **HIDDEN)
    out, prenorm = run_with_prenorm(net, inp)
    torch.testing.assert_close(prenorm, refs[f"b.{path}.prenorm_hidden"], **HIDDEN)
    torch.testing.assert_close(out.hidden, refs[f"b.{path}.hidden"], **HIDDEN)
    torch.testing.assert_close(out.logits, refs[f"b.{path}.logits"], **LOGITS)
    assert torch.equal(net.config.is_semantic(inp[0, 0]), refs["a.is_semantic_inp"])


def test_the_two_embedding_paths_differ_only_at_semantic_positions(refs, model, train_model):
    inp = refs["a.inp"]
    with torch.no_grad():
        scaled, plain = model.slow.embed(inp), train_model.slow.embed(inp)
    semantic = refs["a.is_semantic_inp"]
    assert torch.equal(scaled[0, ~semantic], plain[0, ~semantic])
    torch.testing.assert_close(scaled[0, semantic] * 11**0.5, plain[0, semantic], **HIDDEN)


@torch.no_grad()
def test_cached_slow_steps_reproduce_upstreams_inference_logits(refs, model):
    inp = refs["a.inp"]
    cache = model.new_cache(batch_size=1, max_len=24)
    logits = torch.cat([model(inp[:, :, t : t + 1], cache=cache).logits for t in range(24)], dim=1)
    torch.testing.assert_close(logits, refs["b.infer.logits"], **LOGITS)


# ------------------------------------------------------------------------------------- fast model


@torch.no_grad()
def test_fast_model_reproduces_upstream_teacher_forcing(refs, model, train_model):
    positions, codes = refs["c.positions"], refs["c.codes"]
    assert torch.equal(refs["a.is_semantic_label"].nonzero()[:, 0], positions)
    assert torch.equal(select_fast_rows(refs["a.labels"], 272, 335).codes_NK, codes)
    hidden_train = train_model(refs["a.inp"]).hidden[0, positions]
    torch.testing.assert_close(
        train_model.fast_forward(hidden_train, codes), refs["c.train.fast_logits"], **LOGITS
    )
    hidden = model(refs["a.inp"]).hidden[0, positions]
    torch.testing.assert_close(model.fast_forward(hidden, codes), refs["c.infer.fast_logits"], **LOGITS)
    # Upstream's inference code: step 0 on the hidden state, then one code per step, with a cache.
    cache = model.new_fast_cache(batch_size=len(positions))
    steps = [model.fast_step(model.fast_inputs(hidden), cache)]
    steps += [model.fast_step(model.fast_embed(codes[:, k - 1 : k], k - 1), cache) for k in range(1, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), refs["c.infer.fast_logits"], **LOGITS)


# -------------------------------------------------------------------------------- training batch


@torch.no_grad()
def test_padded_training_batch_and_loss_reproduce_upstream(refs, train_model):
    inp, labels, padding = refs["e.inp"], refs["e.labels"], refs["e.key_padding_mask"]
    # Padding as its own segment: real positions attend exactly as with upstream's key padding mask.
    out = train_model(inp, segment_ids_BT=padding.long())
    torch.testing.assert_close(out.logits[~padding], refs["e.token_logits"][~padding], **LOGITS)
    rows = select_fast_rows(labels, 272, 335)
    assert rows.mask_BT.sum().item() == 24 and rows.mask_BT[1].nonzero()[:, 0].tolist() == [*range(5, 13), 16]
    fast_logits = train_model.fast_forward(out.hidden[rows.mask_BT], rows.codes_NK)
    torch.testing.assert_close(fast_logits, refs["e.fast_logits"], **LOGITS)

    total, base, semantic = refs["e.loss"]
    for slow, fast in ((out.logits, fast_logits), (refs["e.token_logits"], refs["e.fast_logits"])):
        losses = dual_ar_loss(slow, fast, labels, 272, 335)
        torch.testing.assert_close(losses["loss/slow"], base, atol=1e-5, rtol=0)
        torch.testing.assert_close(losses["loss/fast"], semantic, atol=1e-5, rtol=0)
        torch.testing.assert_close(losses["loss/total"], total, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------- generation


def test_greedy_naive_generation_reproduces_upstream(refs, loaded):
    model, info = loaded
    result = generate_naive(model, refs["d.prompt"], im_end_id=info.im_end_id, max_new_tokens=13)
    assert torch.equal(result.tokens, refs["d.generated"]) and not result.stopped
    # Upstream's generate_long drops the last column even when it is a frame; we keep all 13 frames.
    assert torch.equal(result.codes[:, :-1], refs["d.generate_long_codes"])
    # Upstream's call (top_k 1, temperature 0.7, top_p 0.9) is greedy too, whatever the generator draws.
    sampled = generate_naive(
        model,
        refs["d.prompt"],
        im_end_id=info.im_end_id,
        max_new_tokens=5,
        sampling=SamplingParams(temperature=0.7, top_k=1, top_p=0.9, fast_temperature=0.7, fast_top_k=1),
        generator=torch.Generator().manual_seed(42),
    )
    assert torch.equal(sampled.tokens, refs["d.generated"][:, :5])


@torch.no_grad()
def test_decode_step_logits_reproduce_upstream(refs, model):
    prompt, generated = refs["d.prompt"], refs["d.generated"]
    sequence = torch.cat([prompt, generated[:, :-1]], dim=1)[None]  # (1, R, 134 + 12)
    steps = slice(prompt.shape[1] - 1, None)  # the positions whose outputs chose the 13 frames
    full = model(sequence)
    torch.testing.assert_close(full.logits[0, steps], refs["d.slow_logits"], **LOGITS)
    fast = model.fast_forward(full.hidden[0, steps], generated[1:].T)
    torch.testing.assert_close(fast, refs["d.fast_logits"], **LOGITS)
    # The same through the cache: a 134-position prefill, then one frame per step.
    cache = model.new_cache(batch_size=1, max_len=sequence.shape[2])
    outs = [model(sequence[:, :, : prompt.shape[1]], cache=cache)]
    outs += [model(sequence[:, :, t : t + 1], cache=cache) for t in range(prompt.shape[1], sequence.shape[2])]
    cached = torch.cat([o.logits for o in outs], dim=1)
    torch.testing.assert_close(cached[0, steps], refs["d.slow_logits"], **LOGITS)


@pytest.mark.parametrize("layout", ["fixture", "tiny"])
def test_our_export_to_the_released_layout_loads_back_to_the_same_model(layout, tmp_path):
    from s2train.checkpoints import export_release
    from s2train.models.dual_ar import tiny
    from s2train.text.tokenizer import ByteTokenizer, HFTokenizer

    if layout == "fixture":  # the released shapes (10 codebooks, 3 fast layers), its own tokenizer
        model, _ = load_fish_dual_ar(SINGLE)
        tokenizer = HFTokenizer(SINGLE)
    else:  # our tiny preset with random weights and the byte tokenizer, written as a tokenizer.json
        torch.manual_seed(3)
        model, tokenizer = DualAR(tiny()).eval(), ByteTokenizer(4, 64)
    out = export_release(model, tokenizer, tmp_path / "release")
    loaded, info = load_fish_dual_ar(out, residual_codebook_size=model.config.residual_codebook_size)
    assert loaded.config == model.config and info.semantic_ids_from == "tokenizer"
    assert info.im_end_id == tokenizer.token_id("<|im_end|>")
    for ours, theirs in zip(model_logits(loaded), model_logits(model)):
        assert torch.equal(ours, theirs)
    official = set(load_file(out / "model.safetensors"))
    assert official == {k for k in official if k.startswith(("text_model.model.", "audio_decoder."))}
    if layout == "fixture":  # the same key names as the release
        assert official == set(load_file(SINGLE / "model.safetensors"))


def test_a_model_the_released_layout_cannot_describe_is_refused(tmp_path):
    from s2train.checkpoints import export_release
    from s2train.models.dual_ar import demo
    from s2train.text.tokenizer import ByteTokenizer

    model = DualAR(demo())  # a fast table and head per codebook: the release has one shared of each
    with pytest.raises(ValueError, match="fast_shared_embeddings"):
        export_release(model, ByteTokenizer(4, 256), tmp_path / "release")
    assert not (tmp_path / "release").exists()
