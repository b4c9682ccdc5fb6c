"""The Dual-AR model on its tiny preset: causality by gradient, packing, cached decoding equals the full
forward, residual masking, presets, the training loss and the naive generation loop."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from s2train.inference.naive import generate_naive
from s2train.inference.sampling import SamplingParams, allowed_slow_tokens, sample
from s2train.inference.step_decoder import StepDecoder
from s2train.models.dual_ar import DualAR, DualARConfig, s2pro, small, tiny
from s2train.training.dual_ar_loss import dual_ar_loss, select_fast_rows

IM_END = 258  # the tiny tokenizer layout: <|im_end|> sits below the semantic block (272..335)


def make_model(**overrides) -> DualAR:
    torch.manual_seed(0)
    return DualAR(dataclasses.replace(tiny(), **overrides)).eval()


def frame_tokens(cfg: DualARConfig, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random frame tokens (B, 1 + K, T): text ids and semantic frames (row 0 = begin + c0) mixed."""
    g = torch.Generator().manual_seed(seed)
    K = cfg.num_codebooks
    tokens = torch.zeros(batch, 1 + K, length, dtype=torch.long)
    semantic = torch.rand(batch, length, generator=g) < 0.6
    codes = torch.randint(0, cfg.residual_codebook_size, (batch, K, length), generator=g)
    codes[:, 0] = torch.randint(0, cfg.codebook_size, (batch, length), generator=g)
    text = torch.randint(0, cfg.semantic_begin_id, (batch, length), generator=g)
    tokens[:, 0] = torch.where(semantic, cfg.semantic_begin_id + codes[:, 0], text)
    tokens[:, 1:] = torch.where(semantic[:, None], codes, 0)
    return tokens


# ------------------------------------------------------------------------------------ config, presets


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_kv_heads=3), "multiple of n_kv_heads"),
        (dict(residual_codebook_size=65), "residual_codebook_size"),
        (dict(semantic_end_id=300), "one token per semantic code"),
        (dict(semantic_begin_id=300, semantic_end_id=363), "inside the vocabulary"),
        (dict(rope_table_dtype="float16"), "rope_table_dtype"),
        (dict(num_codebooks=1), "num_codebooks"),
        (dict(fast_head_dim=15), "even"),
    ],
)
def test_config_rejects_inconsistent_sizes(overrides, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(tiny(), **overrides)


@pytest.mark.parametrize("preset", [tiny, small, s2pro])
def test_every_preset_builds_with_the_documented_shapes(preset):
    cfg = preset()
    B, T, N = 2, 5, 3
    with torch.device("meta"):
        model = DualAR(cfg)
        out = model(torch.zeros(B, 1 + cfg.num_codebooks, T, dtype=torch.long))
        fast = model.fast_forward(
            torch.zeros(N, cfg.dim), torch.zeros(N, cfg.num_codebooks, dtype=torch.long)
        )
    assert out.logits.shape == (B, T, cfg.vocab_size)
    assert out.hidden.shape == (B, T, cfg.dim)
    assert fast.shape == (N, cfg.num_codebooks, cfg.codebook_size)
    slow_params = sum(p.numel() for p in model.slow.parameters())
    fast_params = sum(p.numel() for p in model.fast.parameters())
    if preset is s2pro:  # DESIGN.md: about 4.1B slow + 0.4B fast
        assert 4.05e9 < slow_params < 4.2e9 and 0.38e9 < fast_params < 0.45e9
    if preset is small:  # one GPU
        assert 100e6 < slow_params + fast_params < 300e6


def test_tiny_runs_on_cpu_with_the_documented_shapes():
    model = make_model()
    cfg = model.config
    tokens = frame_tokens(cfg, 2, 7)
    out = model(tokens)
    assert out.logits.shape == (2, 7, cfg.vocab_size) and out.hidden.shape == (2, 7, cfg.dim)
    assert torch.isfinite(out.logits).all()
    logits = model.fast_forward(out.hidden[0], tokens[0, 1:].T)
    assert logits.shape == (7, cfg.num_codebooks, cfg.codebook_size)
    with pytest.raises(ValueError, match=r"\(B, 1 \+ K, T\)"):
        model(tokens[:, :3])


# -------------------------------------------------------------------------------------- causality


def test_slow_model_is_causal_by_gradient():
    model = make_model()
    x = torch.randn(2, 8, model.config.dim, requires_grad=True)
    hidden = model.slow(x)
    for t in range(8):
        (grad,) = torch.autograd.grad(hidden[:, t].sum(), x, retain_graph=True)
        influence = grad.abs().sum(dim=(0, 2))  # (T,)
        assert (influence[t + 1 :] == 0).all(), f"position {t} sees the future"
        assert (influence[: t + 1] > 0).all(), f"position {t} ignores its past"


def test_segments_block_attention_across_sequences_by_gradient():
    model = make_model()
    x = torch.randn(1, 8, model.config.dim, requires_grad=True)
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    hidden = model.slow(x, segment_ids=segments)
    (grad,) = torch.autograd.grad(hidden[:, 5].sum(), x)
    influence = grad.abs().sum(dim=(0, 2))
    assert (influence[:3] == 0).all() and (influence[3:6] > 0).all() and (influence[6:] == 0).all()


def test_fast_model_is_causal_by_gradient_and_ignores_later_codes():
    model = make_model()
    K, Df = model.config.num_codebooks, model.config.fast_dim
    x = torch.randn(3, K, Df, requires_grad=True)
    hidden = model.fast(x)
    for k in range(K):
        (grad,) = torch.autograd.grad(hidden[:, k].sum(), x, retain_graph=True)
        influence = grad.abs().sum(dim=(0, 2))
        assert (influence[k + 1 :] == 0).all() and (influence[: k + 1] > 0).all()
    # Through the public teacher-forced call: output k depends on c_0 .. c_{k-1} only.
    h = torch.randn(3, model.config.dim)
    codes = torch.randint(0, 32, (3, K))
    base = model.fast_forward(h, codes)
    for k in range(K):
        changed = codes.clone()
        changed[:, k:] = torch.randint(0, 32, (3, K - k))
        torch.testing.assert_close(model.fast_forward(h, changed)[:, : k + 1], base[:, : k + 1])


# ------------------------------------------------------------------------------------------ packing


def test_packed_segments_equal_each_sequence_alone():
    model = make_model()
    a, b = frame_tokens(model.config, 1, 6, seed=1), frame_tokens(model.config, 1, 9, seed=2)
    packed = torch.cat([a, b], dim=2)
    positions = torch.cat([torch.arange(6), torch.arange(9)])[None]
    segments = torch.tensor([[0] * 6 + [1] * 9])
    with torch.no_grad():
        out = model(packed, positions, segments)
        alone_a, alone_b = model(a), model(b)
    torch.testing.assert_close(out.logits[:, :6], alone_a.logits, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[:, 6:], alone_b.logits, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.hidden[:, 6:], alone_b.hidden, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- KV caching


@torch.no_grad()
def test_cached_slow_decoding_equals_the_full_forward():
    model = make_model()
    tokens = frame_tokens(model.config, 2, 14, seed=3)
    full = model(tokens)
    cache = model.new_cache(batch_size=2, max_len=16)
    chunks = [
        (0, 5),
        (5, 6),
        (6, 7),
        (7, 10),
        (10, 11),
        (11, 12),
        (12, 13),
        (13, 14),
    ]  # prefill, steps, a chunk
    pieces = [model(tokens[:, :, start:end], cache=cache) for start, end in chunks]
    assert cache.length == 14
    torch.testing.assert_close(torch.cat([p.logits for p in pieces], 1), full.logits, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([p.hidden for p in pieces], 1), full.hidden, atol=1e-5, rtol=1e-5)
    cache.reset()
    again = model(tokens[:, :, :4], cache=cache)
    torch.testing.assert_close(again.logits, full.logits[:, :4], atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exceed"):
        model(tokens, cache=cache)


@torch.no_grad()
def test_cached_decoding_of_a_left_padded_batch_equals_each_sequence_alone():
    model = make_model()
    long, short = frame_tokens(model.config, 1, 10, seed=4), frame_tokens(model.config, 1, 7, seed=5)
    pad = 3
    batch = torch.cat([long, F.pad(short, (pad, 0))], dim=0)  # (2, R, 10)
    prompt, steps = 7, 3  # prefill 7 slots, then one frame at a time
    positions = torch.stack([torch.arange(10), (torch.arange(10) - pad).clamp_min(0)])
    segments = torch.stack([torch.zeros(10, dtype=torch.long), (torch.arange(10) < pad).long()])
    cache = model.new_cache(batch_size=2, max_len=10)
    outs = [model(batch[:, :, :prompt], positions[:, :prompt], segments[:, :prompt], cache=cache)]
    for t in range(prompt, prompt + steps):
        outs.append(
            model(batch[:, :, t : t + 1], positions[:, t : t + 1], segments[:, t : t + 1], cache=cache)
        )
    logits = torch.cat([o.logits for o in outs], dim=1)
    torch.testing.assert_close(logits[0], model(long).logits[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1, pad:], model(short).logits[0], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(fast_shared_embeddings=False, fast_shared_head=False, fast_dim=32, fast_intermediate_size=64)],
    ids=["s2-style", "per-codebook-projected"],
)
@torch.no_grad()
def test_cached_fast_steps_equal_the_teacher_forced_forward(overrides):
    model = make_model(**overrides)
    cfg = model.config
    hidden = torch.randn(5, cfg.dim)
    codes = torch.randint(0, cfg.residual_codebook_size, (5, cfg.num_codebooks))
    full = model.fast_forward(hidden, codes)  # (N, K, C)
    cache = model.new_fast_cache(batch_size=5)
    for _ in range(2):  # the cache is reused across frames
        cache.reset()
        steps = [model.fast_step(model.fast_inputs(hidden), cache)]
        for k in range(1, cfg.num_codebooks):
            steps.append(model.fast_step(model.fast_embed(codes[:, k - 1 : k], k - 1), cache))
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-5, rtol=1e-5)
    cache.reset()  # a two-position prefill, then the rest at once
    first = model.fast_step(model.fast_inputs(hidden, codes[:, :1]), cache)
    rest = model.fast_step(model.fast_embed(codes[:, 1:-1], 1), cache)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides, dtype",
    [
        ({}, torch.float32),
        (
            dict(
                qk_norm=False,
                fast_qk_norm=True,
                fast_shared_embeddings=False,
                fast_shared_head=False,
                fast_dim=32,
                fast_n_heads=2,
                fast_n_kv_heads=1,
            ),
            torch.float32,
        ),
        ({}, torch.bfloat16),
    ],
    ids=["s2-style", "per-codebook-projected-fast-qk-norm", "bfloat16"],
)
@pytest.mark.parametrize("lengths", [[7], [5, 9, 2], [6, 6, 6]], ids=["one-row", "ragged", "even"])
@torch.no_grad()
def test_the_step_decoder_equals_the_cached_modules_bit_for_bit(overrides, dtype, lengths):
    """StepDecoder (the engine's eager decoding path) against DualAR.forward / fast_step with caches:
    the same hidden states, logits and keys/values, exactly, for rows of equal or different lengths."""
    model = make_model(**overrides).to(dtype)
    cfg, N, K = model.config, len(lengths), model.config.num_codebooks
    decoder = StepDecoder(model, 64)
    ours, theirs = model.new_row_cache(N, 64), model.new_row_cache(N, 64)
    for row, length in enumerate(lengths):
        prompt = frame_tokens(cfg, 1, length, seed=row)
        for cache in (ours, theirs):
            view = cache.rows(row, row + 1)
            model.slow(model.slow.embed(prompt), cache=view)
    g = torch.Generator().manual_seed(0)
    same = lambda a, b: a.dtype == b.dtype and torch.equal(a, b)  # noqa: E731
    fast_ours, fast_theirs = model.new_fast_cache(N), model.new_fast_cache(N)
    for _ in range(4):
        token = torch.randint(cfg.semantic_begin_id - 2, cfg.semantic_end_id + 1, (N, 1), generator=g)
        columns = torch.cat([token, torch.randint(0, cfg.residual_codebook_size, (N, K), generator=g)], 1)
        hidden = model(columns[:, :, None], cache=theirs).hidden[:, 0]
        assert same(decoder.slow_step(columns, ours), hidden)
        assert same(ours.k, theirs.k) and same(ours.v, theirs.v) and same(ours.lengths, theirs.lengths)
        codes = torch.randint(0, cfg.residual_codebook_size, (N, K), generator=g)
        fast_theirs.reset()
        expected = model.fast_step(model.fast_inputs(hidden, codes[:, :1]), fast_theirs)[:, 1]
        assert same(decoder.fast_first(hidden, codes[:, 0], fast_ours), expected)
        for k in range(2, K):
            expected = model.fast_step(model.fast_embed(codes[:, k - 1 : k], k - 1), fast_theirs)[:, 0]
            assert same(decoder.fast_next(codes[:, k - 1], k, fast_ours), expected)
        assert same(fast_ours.k, fast_theirs.k) and same(fast_ours.v, fast_theirs.v)


def test_per_codebook_fast_tables_are_used_per_codebook():
    model = make_model(fast_shared_embeddings=False, fast_shared_head=False)
    cfg = model.config
    assert model.fast.embeddings.weight.shape == ((cfg.num_codebooks - 1) * cfg.codebook_size, cfg.fast_dim)
    assert model.fast.output.weight.shape == (cfg.num_codebooks, cfg.codebook_size, cfg.fast_dim)
    codes = torch.full((1, 3), 7)
    embedded = model.fast_embed(codes, 0)[0]  # the same code in codebooks 0, 1, 2: three different rows
    assert not torch.allclose(embedded[0], embedded[1]) and not torch.allclose(embedded[1], embedded[2])


# --------------------------------------------------------------------------------- residual masking


@torch.no_grad()
def test_residual_logits_beyond_the_residual_codebook_are_impossible():
    model = make_model()
    cfg = model.config  # semantic codebook 64, residual codebooks 32
    logits = model.fast_forward(torch.randn(4, cfg.dim), torch.randint(0, 32, (4, cfg.num_codebooks)))
    assert torch.isfinite(logits[:, 0]).all(), "the semantic codebook (output 0) keeps all 64 codes"
    assert torch.isneginf(logits[:, 1:, 32:]).all()
    assert torch.isfinite(logits[:, 1:, :32]).all()
    cache = model.new_fast_cache(4)
    model.fast_step(model.fast_inputs(torch.randn(4, cfg.dim)), cache)
    step = model.fast_step(model.fast_embed(torch.zeros(4, 1, dtype=torch.long), 0), cache)
    assert torch.isneginf(step[:, 0, 32:]).all() and torch.isfinite(step[:, 0, :32]).all()


# ------------------------------------------------------------------------------------------- the loss


def loss_batch(model: DualAR, seed: int = 0):
    """Inputs, labels (next frame, -100 at text codes and the first two positions) and model outputs."""
    cfg = model.config
    tokens = frame_tokens(cfg, 2, 13, seed=seed)
    inp, labels = tokens[:, :, :-1], tokens[:, :, 1:].clone()
    semantic = model.config.is_semantic(labels[:, 0])
    labels[:, 1:] = torch.where(semantic[:, None], labels[:, 1:], -100)
    labels[:, :, :2] = -100
    out = model(inp)
    rows = select_fast_rows(labels, cfg.semantic_begin_id, cfg.semantic_end_id)
    return inp, labels, out, rows, model.fast_forward(out.hidden[rows.mask_BT], rows.codes_NK)


def test_select_fast_rows_picks_positions_whose_next_token_is_semantic():
    labels = torch.full((2, 5, 4), -100)
    labels[0, 0] = torch.tensor([10, 272, 300, -100])
    labels[1, 0] = torch.tensor([335, 258, 273, 336])
    labels[0, 1:, 1] = torch.tensor([0, 1, 2, 3])
    labels[0, 1:, 2] = torch.tensor([28, 4, 5, 6])
    labels[1, 1:, 0] = torch.tensor([63, 7, 8, 9])
    labels[1, 1:, 2] = torch.tensor([1, 10, 11, 12])
    rows = select_fast_rows(labels, 272, 335)
    assert rows.mask_BT.tolist() == [[False, True, True, False], [True, False, True, False]]
    assert rows.codes_NK.tolist() == [[0, 1, 2, 3], [28, 4, 5, 6], [63, 7, 8, 9], [1, 10, 11, 12]]


def test_dual_ar_loss_is_upstreams_cross_entropies():
    model = make_model()
    _, labels, out, rows, fast_logits = loss_batch(model)
    losses = dual_ar_loss(out.logits, fast_logits, labels, 272, 335)
    slow = F.cross_entropy(out.logits.flatten(0, 1), labels[:, 0].flatten(), ignore_index=-100)
    fast = F.cross_entropy(fast_logits.flatten(0, 1), rows.codes_NK.flatten(), ignore_index=-100)
    torch.testing.assert_close(losses["loss/slow"], slow)
    torch.testing.assert_close(losses["loss/fast"], fast)
    torch.testing.assert_close(losses["loss/total"], slow + fast)
    K = model.config.num_codebooks
    for k in range(K):
        expected = F.cross_entropy(fast_logits[:, k], rows.codes_NK[:, k])
        torch.testing.assert_close(losses[f"loss/codebook_{k}"], expected)
        hits = (fast_logits[:, k].argmax(-1) == rows.codes_NK[:, k]).float().mean()
        torch.testing.assert_close(losses[f"acc/codebook_{k}"], hits)
        assert not losses[f"loss/codebook_{k}"].requires_grad
    assert losses["loss/total"].requires_grad
    losses["loss/total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    no_c0 = dual_ar_loss(out.logits, fast_logits, labels, 272, 335, include_c0=False)
    torch.testing.assert_close(
        no_c0["loss/fast"], torch.stack([losses[f"loss/codebook_{k}"] for k in range(1, K)]).mean()
    )
    weighted = dual_ar_loss(out.logits, fast_logits, labels, 272, 335, weights={"loss/fast": 0.5})
    torch.testing.assert_close(weighted["loss/total"], slow + 0.5 * fast)
    with pytest.raises(ValueError, match="unknown Dual-AR loss weights"):
        dual_ar_loss(out.logits, fast_logits, labels, 272, 335, weights={"loss/semantic": 1.0})
    with pytest.raises(ValueError, match="do not match"):
        dual_ar_loss(out.logits, fast_logits[1:], labels, 272, 335)


def test_dual_ar_loss_ignores_minus_100_everywhere():
    model = make_model()
    _, labels, out, rows, fast_logits = loss_batch(model, seed=1)
    base = dual_ar_loss(out.logits, fast_logits, labels, 272, 335)
    # Ignored slow positions and ignored codes may have any logits.
    slow_logits = out.logits.detach().clone()
    slow_logits[labels[:, 0] == -100] = 1e4 * torch.randn_like(slow_logits[labels[:, 0] == -100])
    codes = rows.codes_NK.clone()
    codes[0, 3] = -100
    labels_with_hole = labels.clone()
    labels_with_hole[:, 1:].transpose(1, 2)[rows.mask_BT] = codes
    changed = fast_logits.detach().clone()
    changed[0, 3] = 1e4
    moved = dual_ar_loss(slow_logits, changed, labels_with_hole, 272, 335)
    torch.testing.assert_close(moved["loss/slow"], base["loss/slow"].detach())
    valid = codes != -100
    expected = F.cross_entropy(fast_logits.detach()[valid], codes[valid])
    torch.testing.assert_close(moved["loss/fast"], expected)
    # Nothing to learn: zero losses with finite gradients, not NaN.
    nothing = torch.full_like(labels, -100)
    empty = dual_ar_loss(out.logits, fast_logits[:0], nothing, 272, 335)
    assert empty["loss/total"].item() == 0 and empty["acc/slow"].item() == 0
    empty["loss/total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_accuracies_count_argmax_hits():
    model = make_model()
    _, labels, out, rows, fast_logits = loss_batch(model, seed=2)
    valid = labels[:, 0] != -100
    perfect_slow = F.one_hot(labels[:, 0].clamp_min(0), model.config.vocab_size).float()
    perfect_fast = F.one_hot(rows.codes_NK, model.config.codebook_size).float()
    losses = dual_ar_loss(perfect_slow, perfect_fast, labels, 272, 335)
    assert losses["acc/slow"].item() == 1.0 and valid.sum() > 0
    assert all(losses[f"acc/codebook_{k}"].item() == 1.0 for k in range(model.config.num_codebooks))


# ------------------------------------------------------------------------------- sampling, generation


def test_sampler_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    assert sample(logits).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    assert sample(logits, temperature=5.0, top_k=1, generator=g).tolist() == [1, 0]
    assert sample(logits, temperature=5.0, top_p=0.01, generator=g).tolist() == [1, 0]
    draws = torch.stack([sample(logits, temperature=1.0, top_k=2, generator=g) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {1, 3}, "top-k 2 keeps exactly the two best tokens"
    a = sample(logits.repeat(50, 1), temperature=2.0, generator=torch.Generator().manual_seed(7))
    b = sample(logits.repeat(50, 1), temperature=2.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="top_p"):
        sample(logits, temperature=1.0, top_p=0.0)
    allowed = allowed_slow_tokens(344, 272, 335, IM_END)
    assert allowed.sum() == 65 and allowed[IM_END] and allowed[272] and allowed[335] and not allowed[271]


def test_naive_generation_follows_the_s2_decoding_rule():
    model = make_model()
    cfg = model.config
    prompt = frame_tokens(cfg, 1, 6, seed=6)[0]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    hot = SamplingParams(temperature=5.0, top_p=1.0, fast_temperature=5.0, fast_top_p=1.0, ras_window=0)
    run = dict(im_end_id=IM_END, max_new_tokens=6, sampling=hot)
    first = generate_naive(model, prompt, generator=g1, **run)
    second = generate_naive(model, prompt, generator=g2, **run)
    assert torch.equal(first.tokens, second.tokens), "the generator makes sampling reproducible"
    if first.stopped:
        assert first.tokens[0, -1] == IM_END and (first.tokens[1:, -1] == 0).all()
    frames = first.codes
    assert frames.shape == (cfg.num_codebooks, first.tokens.shape[1] - int(first.stopped))
    semantic_ids = first.tokens[0, : frames.shape[1]]
    assert model.config.is_semantic(semantic_ids).all()
    assert torch.equal(frames[0], semantic_ids - cfg.semantic_begin_id), "c0 is the slow token's code"
    assert (frames[1:] < cfg.residual_codebook_size).all(), "residual codes stay inside their codebook"

    greedy = generate_naive(model, prompt, im_end_id=IM_END, max_new_tokens=4)
    # Greedy equals teacher-forced argmax of the model over its own output.
    sequence = torch.cat([prompt, greedy.tokens], dim=1)
    with torch.no_grad():
        out = model(sequence[None])
        slow = out.logits[0, 5:-1].masked_fill(~allowed_slow_tokens(344, 272, 335, IM_END), float("-inf"))
        fast = model.fast_forward(out.hidden[0, 5:-1], greedy.tokens[1:].T)
    n = greedy.codes.shape[1]  # frames, without an ending <|im_end|> column
    assert n >= 1 and torch.equal(slow.argmax(-1), greedy.tokens[0])
    assert torch.equal(fast[:n, 1:].argmax(-1), greedy.codes[1:].T)


def test_naive_generation_stops_at_im_end():
    model = make_model()
    with torch.no_grad():
        model.slow.norm.weight.zero_()  # every logit 0: the first allowed id, <|im_end|> (258 < 272), wins
    result = generate_naive(model, frame_tokens(model.config, 1, 4)[0], im_end_id=IM_END, max_new_tokens=5)
    assert result.stopped and result.tokens.tolist() == [[IM_END]] + [[0]] * model.config.num_codebooks
    assert result.codes.shape == (model.config.num_codebooks, 0)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate_naive(model, frame_tokens(model.config, 1, 4)[0], im_end_id=IM_END, max_new_tokens=2000)
