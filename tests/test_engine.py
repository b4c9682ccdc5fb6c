"""The inference engine on the tiny model: cached decoding equals the full forward, a continuously batched
run gives each request its own tokens, a prefix-cache hit equals a miss, a seed fixes the audio,
streaming equals one-shot decoding, exact-mode log-probs equal the training forward's, and greedy
generation from the S2 Pro fixture's chat prompt reproduces upstream's codes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from s2train.inference.engine import InferenceEngine, PrefixCache, Request, speech_request, stream_audio
from s2train.inference.naive import generate_naive
from s2train.inference.sampling import SamplingParams, SlowVocab, allowed_slow_tokens
from s2train.models.codec import Codec
from s2train.models.codec import tiny as codec_tiny
from s2train.models.dual_ar import DualAR, tiny
from s2train.text.prompt import Reference, build_prompt, inputs_and_labels
from s2train.text.tokenizer import ByteTokenizer, HFTokenizer
from s2train.training.dual_ar_loss import select_fast_rows

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "fish_s2"  # released S2 Pro formats, tiny weights
IM_END = 258  # ByteTokenizer(4, 64): the tiny fixture layout, semantic tokens 272..335
GREEDY = SamplingParams.greedy()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Decoding the tiny model is thousands of small ops: a second thread on a busy CPU only waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> DualAR:
    torch.manual_seed(0)
    return DualAR(tiny()).eval()


@pytest.fixture(scope="module")
def tokenizer() -> ByteTokenizer:
    return ByteTokenizer(4, 64)


@pytest.fixture(scope="module")
def codec() -> Codec:
    torch.manual_seed(1)
    return Codec(codec_tiny()).eval()  # 1 x 64 semantic + 3 x 32 residual codes: the tiny model's K = 4


def voice(seed: int, frames: int = 12) -> Reference:
    g = torch.Generator().manual_seed(seed)
    codes = torch.cat(
        [torch.randint(0, 64, (1, frames), generator=g), torch.randint(0, 32, (3, frames), generator=g)]
    )
    return Reference(f"Voice number {seed}.", codes)


# ------------------------------------------------------------------------------------------ the cache


@torch.no_grad()
def test_row_cache_decoding_equals_the_full_forward(model):
    """Rows of different lengths, each prefilled alone in chunks, then stepped together, each at its own
    position: every slow logit equals the full forward of that row's sequence."""
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    lengths = [9, 4, 13]
    seqs = []
    for n in lengths:
        tokens = torch.zeros(1 + cfg.num_codebooks, n + 5, dtype=torch.long)
        tokens[0] = torch.randint(0, 272, (n + 5,), generator=g)
        tokens[1:, n:] = torch.randint(0, 32, (cfg.num_codebooks, 5), generator=g)
        tokens[0, n:] = 272 + tokens[1, n:]
        seqs.append(tokens)
    cache = model.new_row_cache(3, 20)
    logits = [[] for _ in lengths]
    for row, (seq, n) in enumerate(zip(seqs, lengths)):
        view = cache.rows(row, row + 1)
        for a, b in ((0, n // 2), (n // 2, n)):  # a prompt in two chunks
            logits[row].append(model(seq[None, :, a:b], cache=view).logits[0])
    for t in range(5):  # then the rows together, one position each
        columns = torch.stack([seq[:, n + t] for seq, n in zip(seqs, lengths)])[:, :, None]
        out = model(columns, cache=cache).logits
        for row in range(3):
            logits[row].append(out[row])
    assert cache.lengths.tolist() == [n + 5 for n in lengths]
    for row, seq in enumerate(seqs):
        full = model(seq[None]).logits[0]
        torch.testing.assert_close(torch.cat(logits[row]), full, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="segment ids"):
        model(columns, segment_ids_BT=torch.zeros(3, 1, dtype=torch.long), cache=cache)


def test_allowed_logits_are_the_lm_head_rows_of_the_allowed_tokens(model):
    engine = InferenceEngine(model, IM_END)
    hidden = torch.randn(3, model.config.dim)
    with torch.no_grad():
        full = model.slow.logits(hidden)
        allowed = allowed_slow_tokens(344, 272, 335, IM_END)
        torch.testing.assert_close(engine.allowed_logits(hidden), full[:, allowed], atol=1e-5, rtol=0)
    vocab = SlowVocab.of(model.config, IM_END)
    assert vocab.size == 65 and vocab.end_index == 0 and vocab.allowed_ids[1] == 272


# --------------------------------------------------------------------------------------- batching


def prompts(model, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        p = torch.zeros(1 + model.config.num_codebooks, n, dtype=torch.long)
        p[0] = torch.randint(0, 256, (n,), generator=g)
        out.append(p)
    return out


def test_a_continuously_batched_run_gives_each_request_its_tokens_alone(model):
    """Seven requests of different prompt and output lengths through 3 rows: requests join as others
    leave. Greedy ones get the tokens of the naive loop; sampled ones the tokens of their seed alone."""
    lengths, limits = [20, 35, 12, 50, 8, 27, 16], [30, 10, 25, 40, 5, 18, 22]
    sampled = SamplingParams(temperature=1.0, top_p=0.95, top_k=40, fast_temperature=0.9)
    requests = [
        Request(p, max_new_tokens=m, sampling=sampled if i % 2 else GREEDY, seed=100 + i)
        for i, (p, m) in enumerate(zip(prompts(model, lengths), limits))
    ]
    batched = InferenceEngine(model, IM_END, max_batch=3).generate(requests)
    alone = InferenceEngine(model, IM_END, max_batch=1)
    for request, result in zip(requests, batched):
        assert result.tokens.shape[1] == request.max_new_tokens or result.stopped
        assert torch.equal(result.tokens, alone.generate([request])[0].tokens)
        generator = torch.Generator().manual_seed(request.seed)
        naive = generate_naive(
            model,
            request.prompt,
            im_end_id=IM_END,
            max_new_tokens=request.max_new_tokens,
            sampling=request.sampling,
            generator=generator,
        )
        assert torch.equal(result.tokens, naive.tokens), "the engine draws exactly what the naive loop draws"


def test_the_eager_step_decoder_draws_what_the_modules_draw(model, monkeypatch):
    """The eager engine decodes through StepDecoder; through the modules (its path under a CUDA graph)
    a batch of ragged rows with sampling, repetition-aware sampling and a minimum length draws the same."""
    import s2train.inference.engine as engine_module

    lengths, limits = [20, 35, 12, 50, 8], [30, 10, 25, 40, 15]
    requests = [
        Request(p, max_new_tokens=m, min_new_tokens=m // 2, sampling=SamplingParams(), seed=7 + i)
        for i, (p, m) in enumerate(zip(prompts(model, lengths), limits))
    ]
    decoded = InferenceEngine(model, IM_END, max_batch=3).generate(requests)
    monkeypatch.setattr(engine_module, "StepDecoder", lambda model, max_len: None)
    through_modules = InferenceEngine(model, IM_END, max_batch=3).generate(requests)
    for a, b in zip(decoded, through_modules):
        assert torch.equal(a.tokens, b.tokens)


def test_steps_arrive_in_order_and_fixed_lengths_hold(model):
    requests = [
        Request(p, max_new_tokens=6, min_new_tokens=6, seed=i) for i, p in enumerate(prompts(model, [5, 9]))
    ]
    engine = InferenceEngine(model, IM_END, max_batch=2)
    seen = {0: [], 1: []}
    for step in engine.run(requests):
        seen[step.index].append(step.column)
        if step.done is not None:
            assert torch.equal(torch.stack(seen[step.index], dim=1), step.done.tokens)
    assert [len(v) for v in seen.values()] == [6, 6] and set(engine.first_frame_s) == {0, 1}


def test_generation_stops_at_im_end_and_checks_requests(model):
    silent = DualAR(model.config).eval()
    silent.load_state_dict(model.state_dict())
    with torch.no_grad():
        silent.slow.norm.weight.zero_()  # every logit 0: the first allowed id, <|im_end|> (258 < 272), wins
    [p] = prompts(model, [6])
    engine = InferenceEngine(silent, IM_END)
    [result] = engine.generate([Request(p, max_new_tokens=5, sampling=GREEDY)])
    assert (
        result.stopped and result.tokens.tolist() == [[IM_END]] + [[0]] * 4 and result.codes.shape == (4, 0)
    )
    [forced] = engine.generate([Request(p, max_new_tokens=3, min_new_tokens=3, sampling=GREEDY)])
    assert not forced.stopped and forced.codes.shape == (4, 3), "min_new_tokens holds <|im_end|> back"
    for bad, message in [
        (dict(max_new_tokens=2000), "max_seq_len"),
        (dict(min_new_tokens=9, max_new_tokens=3), "min_new_tokens"),
        (dict(prefix_len=6), "prefix_len"),
    ]:
        with pytest.raises(ValueError, match=message):
            engine.generate([Request(p, **bad)])
    with pytest.raises(ValueError, match=r"\(1 \+ K, T\)"):
        engine.generate([Request(p[:3])])
    with pytest.raises(ValueError, match="exact sampling"):
        SamplingParams(exact=True)


# ----------------------------------------------------------------------------------- prefix cache


def test_a_prefix_cache_hit_equals_a_miss(model, tokenizer):
    exact = SamplingParams.exact_at(1.0)
    texts = ["Good morning.", "A different sentence, longer than the first one."]
    requests = [
        speech_request(tokenizer, t, 4, references=[voice(1)], max_new_tokens=12, sampling=exact, seed=i)
        for i, t in enumerate(texts)
    ]
    assert requests[0].prefix_len == requests[1].prefix_len > 12  # the system turn with the voice's frames
    cached = InferenceEngine(model, IM_END, max_batch=1)
    first, second = cached.generate(requests)
    assert not first.prefix_hit and second.prefix_hit
    assert (cached.prefix_cache.misses, cached.prefix_cache.hits) == (1, 1)
    fresh = InferenceEngine(model, IM_END, max_batch=1, prefix_cache_mb=0)
    miss = fresh.generate([requests[1]])[0]
    assert not miss.prefix_hit and fresh.prefix_cache.hits == 0 and not fresh.prefix_cache.entries
    assert torch.equal(second.tokens, miss.tokens)
    torch.testing.assert_close(second.slow_logprobs, miss.slow_logprobs, atol=2e-5, rtol=0)
    torch.testing.assert_close(second.fast_logprobs, miss.fast_logprobs, atol=2e-5, rtol=0)
    # The plain system turn (no reference) is a shared prefix as well.
    plain = speech_request(tokenizer, "No voice.", 4, max_new_tokens=4, sampling=GREEDY)
    assert plain.prefix_len > 0 and speech_request(tokenizer, "x", 4, system_turn=False).prefix_len == 0


def test_the_prefix_cache_is_bounded_and_evicts_the_least_recently_used():
    k = torch.zeros(2, 2, 10, 4)  # 640 bytes, with v 1280 an entry
    cache = PrefixCache(max_bytes=3000)
    keys = [PrefixCache.key(torch.full((5, 3), i)) for i in range(3)]
    assert len(set(keys)) == 3 and PrefixCache.key(torch.full((5, 3), 1)) == keys[1]
    cache.put(keys[0], k, k.clone())
    cache.put(keys[1], k, k.clone())
    assert cache.get(keys[0]) is not None  # 0 is now the most recent
    cache.put(keys[2], k, k.clone())  # 3 x 1280 > 3000: evicts 1
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None and cache.get(keys[2]) is not None
    assert cache.bytes == 2560 and cache.evictions == 1
    cache.put(PrefixCache.key(torch.zeros(1)), torch.zeros(1000), torch.zeros(1000))  # larger than the bound
    assert len(cache.entries) == 2
    cache.clear()
    assert cache.bytes == 0 and not cache.entries


# ------------------------------------------------------------------------------ seeds and streaming


def test_the_same_seed_gives_the_same_audio(model, tokenizer, codec):
    sampling = SamplingParams(temperature=1.0, top_p=0.9, fast_temperature=1.0)
    make = lambda text, seed: speech_request(  # noqa: E731
        tokenizer, text, 4, max_new_tokens=10, min_new_tokens=10, sampling=sampling, seed=seed
    )
    target = make("Say it again.", 7)
    alone = InferenceEngine(model, IM_END, max_batch=1).generate([target])[0]
    others = [make("Something else.", 1), make("And more.", 2)]
    batched = InferenceEngine(model, IM_END, max_batch=3).generate([*others, target])[2]
    again = InferenceEngine(model, IM_END, max_batch=2).generate([target, *others])[0]
    with torch.no_grad():
        audio = [codec.decode(g.codes) for g in (alone, batched, again)]
        other_seed = InferenceEngine(model, IM_END).generate([dataclasses.replace(target, seed=8)])[0]
    assert torch.equal(audio[0], audio[1]) and torch.equal(audio[0], audio[2])
    assert not torch.equal(alone.tokens, other_seed.tokens), "another seed draws other tokens"


def test_streamed_audio_equals_the_one_shot_decode(model, tokenizer, codec):
    requests = [
        speech_request(tokenizer, "Stream me.", 4, max_new_tokens=17, min_new_tokens=17, seed=3),
        speech_request(
            tokenizer, "Me too.", 4, references=[voice(2)], max_new_tokens=9, min_new_tokens=9, seed=4
        ),
        speech_request(tokenizer, "Short.", 4, max_new_tokens=2, min_new_tokens=2, seed=5),
    ]
    engine = InferenceEngine(model, IM_END, max_batch=2)
    chunks = {0: [], 1: [], 2: []}
    for chunk in stream_audio(engine, codec, requests, first_chunk_frames=3, chunk_frames=5):
        assert not any(c.final for c in chunks[chunk.index]), "nothing after the final chunk"
        chunks[chunk.index].append(chunk)
    spf = codec.samples_per_frame
    assert [len(c.audio) // spf for c in chunks[0]] == [3, 5, 5, 4]  # first audio after 3 frames
    assert [len(c.audio) // spf for c in chunks[2]] == [2]
    for parts in chunks.values():
        generation = parts[-1].generation
        assert parts[-1].final and generation is not None
        with torch.no_grad():
            whole = codec.decode(generation.codes)[0, 0]
        torch.testing.assert_close(torch.cat([c.audio for c in parts]), whole, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- exact mode


@torch.no_grad()
def test_exact_mode_log_probs_equal_the_training_forward(model, tokenizer):
    """The log-prob of every sampled slow token and code equals log_softmax(logits / T) of the training
    forward over the same tokens: the prompt builder's training sequence, model.forward, the fast rows
    of the labels and fast_forward."""
    cfg = model.config
    temperature, fast_temperature = 1.3, 0.8
    sampling = SamplingParams.exact_at(temperature, fast_temperature)
    texts = ["One two three.", "Four.", "Five six seven eight nine."]
    requests = [
        speech_request(
            tokenizer,
            t,
            4,
            references=[voice(i)] if i else (),
            max_new_tokens=40,
            sampling=sampling,
            seed=50 + i,
        )
        for i, t in enumerate(texts)
    ]
    results = InferenceEngine(model, IM_END, max_batch=2).generate(requests)
    allowed = allowed_slow_tokens(cfg.vocab_size, cfg.semantic_begin_id, cfg.semantic_end_id, IM_END)
    checked_stop = False
    for i, (request, result) in enumerate(zip(requests, results)):
        frames = result.codes.shape[1]
        assert result.slow_logprobs.shape == (result.tokens.shape[1],)
        assert result.fast_logprobs.shape == (frames, cfg.num_codebooks - 1)
        assert (result.slow_logprobs <= 0).all() and (result.fast_logprobs <= 0).all()
        references = [voice(i)] if i else ()
        train = build_prompt(tokenizer, texts[i], 4, codes=result.codes, references=references)
        if result.stopped:  # the training sequence is exactly prompt + generated columns
            assert torch.equal(train.tokens, torch.cat([request.prompt, result.tokens], dim=1))
            checked_stop = True
        inputs, labels = inputs_and_labels(train, tokenizer)
        if not result.stopped:  # generation ended at max_new_tokens: no <|im_end|> to learn
            labels[0, -1] = -100
        out = model(inputs[None])
        targets = labels[0]
        trained = targets != -100
        slow = (out.logits[0].masked_fill(~allowed, float("-inf")) / temperature).log_softmax(-1)
        slow_lp = slow[trained].gather(-1, targets[trained][:, None])[:, 0]
        torch.testing.assert_close(result.slow_logprobs, slow_lp, atol=2e-5, rtol=0)
        rows = select_fast_rows(labels[None], cfg.semantic_begin_id, cfg.semantic_end_id)
        fast_logits = model.fast_forward(out.hidden[rows.mask_BT], rows.codes_NK)
        fast = (fast_logits[:, 1:] / fast_temperature).log_softmax(-1)
        fast_lp = fast.gather(-1, rows.codes_NK[:, 1:, None])[..., 0]
        torch.testing.assert_close(result.fast_logprobs, fast_lp, atol=2e-5, rtol=0)
    assert checked_stop and [r.stopped for r in results] == [False, True, True]  # both endings checked


# ---------------------------------------------------------------------------------- upstream parity


def test_greedy_engine_generation_reproduces_upstream():
    from safetensors.torch import load_file

    from s2train.compat.fish_dual_ar import load_fish_dual_ar

    refs = load_file(FIXTURES / "dualar_refs.safetensors")
    fish, info = load_fish_dual_ar(FIXTURES / "tiny_s2pro")
    hf = HFTokenizer(FIXTURES / "tiny_s2pro")
    request = speech_request(
        hf,
        "<|speaker:0|>Hello world.",
        10,
        references=[Reference("<|speaker:0|>Hi.", refs["d.reference_codes"])],
        max_new_tokens=13,
        sampling=GREEDY,
    )
    assert torch.equal(request.prompt, refs["d.prompt"])  # the chat prompt upstream built
    # Upstream's own call (top_k 1 at temperature 0.7, top-p 0.9, repetition-aware sampling) is greedy too.
    upstream_call = SamplingParams(temperature=0.7, top_p=0.9, top_k=1, fast_temperature=0.7, fast_top_k=1)
    other = Request(refs["d.prompt"][:, :100], max_new_tokens=4, sampling=GREEDY)
    engine = InferenceEngine(fish, info.im_end_id, max_batch=2)
    results = engine.generate([request, other, dataclasses.replace(request, sampling=upstream_call, seed=42)])
    for result in (results[0], results[2]):
        assert torch.equal(result.tokens, refs["d.generated"]) and not result.stopped
        # Upstream's generate_long drops the last column even when it is a frame; we keep all 13 frames.
        assert torch.equal(result.codes[:, :-1], refs["d.generate_long_codes"])
    assert results[2].prefix_hit, "the second request with the same reference reused its prefix"


# ------------------------------------------------------------------------------------- compiled (CPU)


@pytest.mark.slow
def test_the_compiled_cpu_step_draws_what_the_eager_step_draws(model, tokenizer):
    """``compile=True``: the fixed-shape step of all rows compiled by inductor. Ragged requests joining and
    leaving three rows, greedy and sampled (repetition-aware, a minimum length), draw the eager engine's
    tokens; a second run of the same shape reuses the compiled step."""
    requests = [
        speech_request(tokenizer, f"Sentence number {i}.", 4, max_new_tokens=12 + 7 * i, sampling=GREEDY)
        for i in range(5)
    ]
    sampled = [
        dataclasses.replace(r, sampling=SamplingParams(), min_new_tokens=6, seed=10 + i)
        for i, r in enumerate(requests)
    ]
    compiled = InferenceEngine(model, IM_END, max_batch=3, compile=True)
    eager = InferenceEngine(model, IM_END, max_batch=3)
    for batch in (requests, sampled):
        for a, b in zip(compiled.generate(batch), eager.generate(batch)):
            assert torch.equal(a.tokens, b.tokens)
    step = compiled._last_batch.graph
    again = compiled.generate(sampled)
    assert compiled._last_batch.graph is step, "the same rows and slots reuse the compiled step"
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(again, eager.generate(sampled)))


def test_compile_runs_a_fixed_shape_step_and_only_on_a_cpu(model):
    engine = InferenceEngine(model, IM_END, compile=True)
    assert engine.static and not engine.cuda_graph
    if torch.cuda.is_available():  # pragma: no cover - needs CUDA
        with pytest.raises(ValueError, match="on CUDA use cuda_graph"):
            InferenceEngine(DualAR(tiny()).to("cuda"), IM_END, compile=True)


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_cuda_graph_generation_matches_eager_and_cpu():  # pragma: no cover - needs CUDA
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.manual_seed(0)
    cpu_model = DualAR(tiny()).eval()
    model = DualAR(tiny()).eval()
    model.load_state_dict(cpu_model.state_dict())
    model = model.to("cuda")
    tokenizer = ByteTokenizer(4, 64)
    requests = [
        speech_request(tokenizer, f"Sentence {i}.", 4, max_new_tokens=20 + 5 * i, sampling=GREEDY)
        for i in range(5)
    ]
    assert InferenceEngine(model, IM_END).cuda_graph, "CUDA graphs are the default on a GPU"
    graphed = InferenceEngine(model, IM_END, max_batch=3).generate(requests)
    eager = InferenceEngine(model, IM_END, max_batch=3, cuda_graph=False).generate(requests)
    on_cpu = InferenceEngine(cpu_model, IM_END, max_batch=3).generate(requests)
    for a, b, c in zip(graphed, eager, on_cpu):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens, c.tokens)
    # bfloat16 with sampling: a seed repeats, and a reused batch replays its graph.
    model = model.to(torch.bfloat16)
    sampled = [dataclasses.replace(r, sampling=SamplingParams(), seed=i) for i, r in enumerate(requests)]
    engine = InferenceEngine(model, IM_END, max_batch=3)
    once, twice = engine.generate(sampled), engine.generate(sampled)
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(once, twice))
    assert all(g.codes.shape[1] >= 1 or g.stopped for g in once)
