"""The shared inference engine: batched, cached, continuously batched Dual-AR generation, and streaming.

Shape legend: K codebooks, R = 1 + K rows of a frame-token tensor, T prompt positions, N rows of the
running batch, S key/value slots per row, A allowed slow tokens (C semantic tokens and ``<|im_end|>``),
C codebook size, D slow model dim, L layers, Hkv key/value heads, Dh head dim.

GRPO rollouts, evaluation, ``stage=synthesize`` and the server all generate through ``InferenceEngine``::

    engine = InferenceEngine(model, im_end_id=tokenizer.token_id("<|im_end|>"), max_batch=8)
    request = speech_request(tokenizer, "Hello world.", model.config.num_codebooks, references=[voice])
    [generation] = engine.generate([request])                  # generation.codes: (K, frames)
    for chunk in stream_audio(engine, codec, [request]): ...   # audio as it is generated

**How a run goes** (``InferenceEngine.run``). One ``RowKVCache`` of ``min(max_batch, requests)`` rows x
S slots is allocated for the requests at hand, S = the longest prompt plus its ``max_new_tokens``, rounded
up to a multiple of 128 (no fixed 32k buffer, no full-size mask); the next run reuses it (and its CUDA
graph) when it needs the same rows and slots. A row is one request:

1. *Join.* A free row takes the next queued request. If the request names a reusable prefix
   (``Request.prefix_len``: its system turn, i.e. the reference voice) and the ``PrefixCache`` holds that
   prefix, its keys and values are copied into the row and only the rest of the prompt is run; otherwise
   the whole prompt is run and the prefix's keys and values are stored (least recently used ones are
   evicted beyond ``prefix_cache_mb``). The prompt runs in that row alone, so joining costs the running
   rows nothing.
2. *A frame for every running row at once* (``decode_frame``, S2's rule, ``sampling.py``): the slow
   token from the slow logits of the allowed tokens, c0 from it, then the fast loop over the residual
   codebooks with a fast ``KVCache`` (a two-position first step on [hidden, E(c0)], then one position per
   code: K - 1 fast calls). Then one slow step runs the new columns of all rows, each at its own
   position, and gives the next slow logits.
3. *Leave.* A row that drew ``<|im_end|>`` or reached ``max_new_tokens`` is freed; the last running row is
   moved into it, so the running rows are always rows 0..N-1 and a step runs exactly those.

Each request samples with its own ``SamplingParams`` and its own generator (``Request.seed``), so its
tokens do not depend on the other requests of the batch: greedy decoding of a batch gives each request's
tokens alone, and a seed gives the same audio alone or batched (and in ``generate_naive``).

**Speed paths.** On a CPU every step runs eagerly over the running rows, attending to the filled slots
only, through ``StepDecoder`` (``step_decoder.py``: the slow and fast models for one new position per
row in about half the tensor operations of the modules, with the same numbers) under
``torch.inference_mode``; a small model's frame is bound by the number of operations, not by arithmetic. On CUDA (``cuda_graph``,
the default there) the frame step (fast loop, sampling and the slow step for all rows of the batch) is
captured once as a CUDA graph over fixed shapes (``RowKVCache(static=True)``: every slot, masked) and
replayed each frame; only the per-request noise is drawn outside it. Load the model in bfloat16 for speed
there (``stage=synthesize`` does). On a CPU, ``compile=True`` runs the same fixed-shape step compiled by
``torch.compile`` (inductor, C++ kernels and a C++ wrapper): one call a frame instead of hundreds of ATen
calls, after a minute or two of compiling per batch shape (rows and slots). The prompts (joins) run
eagerly on every path.

**Streaming** (``stream_audio``): each request's frames go to its own causal streaming codec decoder;
its first audio leaves after ``first_chunk_frames`` frames, then every ``chunk_frames``; the chunks of a
request joined equal ``codec.decode`` of all its frames.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from s2train.inference.sampling import FrameNoise, RowSampler, SamplingParams, SlowVocab, decode_frame
from s2train.inference.step_decoder import StepDecoder
from s2train.models.codec import Codec
from s2train.models.dual_ar import DualAR
from s2train.text.prompt import Reference, build_prompt
from s2train.text.tokenizer import TextTokenizer

SLOT_QUANTUM = 128  # a batch's key/value slots per row are a multiple of this (see _batch_for)

# ------------------------------------------------------------------------------------ requests, results


@dataclass
class Request:
    """One utterance to generate: the frames that follow ``prompt``."""

    prompt: Tensor  # (1 + K, T), from build_prompt (speech_request builds one)
    max_new_tokens: int = 1024  # frames (plus an ending <|im_end|> column)
    min_new_tokens: int = 0  # <|im_end|> may not be drawn before this many frames (= max: a fixed length)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None  # the request's own generator; None: drawn from torch's global generator
    prefix_len: int = 0  # the first positions (the system turn: a reference voice) may be shared and cached


@dataclass
class Generation:
    """What a request generated."""

    tokens: Tensor  # (1 + K, n): the columns appended after the prompt
    stopped: bool  # True when generation ended on <|im_end|>, False when it hit max_new_tokens
    slow_logprobs: Tensor | None = None  # (n,) exact mode: log-prob of every slow token, <|im_end|> included
    fast_logprobs: Tensor | None = None  # (frames, K - 1) exact mode: log-prob of c1 .. c_{K-1} of each frame
    prefix_hit: bool = False  # the prompt's prefix came from the prefix cache

    @property
    def codes(self) -> Tensor:
        """(K, frames): the generated frames' codes, without the ending <|im_end|> column."""
        frames = self.tokens[:, :-1] if self.stopped else self.tokens
        return frames[1:]


@dataclass
class Step:
    """One column of one request, as ``InferenceEngine.run`` produces it."""

    index: int  # the request's place in the list given to run()
    column: Tensor  # (1 + K,) on the CPU: the slow token, then c0 .. c_{K-1}
    done: Generation | None  # set on the request's last column


def speech_request(
    tokenizer: TextTokenizer,
    text: str,
    num_codebooks: int,
    *,
    references: Sequence[Reference] = (),
    system_turn: bool = True,
    literal: bool = False,
    caption: str | None = None,
    **fields,
) -> Request:
    """A ``Request`` for ``text`` (in the voice of ``references``) with the prompt ``build_prompt`` makes,
    the one training uses; its system turn (references, or the plain system prompt) is the shared prefix.
    ``literal``: the texts are plain text; ``caption``: how to speak (``build_prompt``). ``fields`` are the
    other ``Request`` fields."""
    prompt = build_prompt(
        tokenizer,
        text,
        num_codebooks,
        references=references,
        system_turn=system_turn,
        literal=literal,
        caption=caption,
    )
    starts = (prompt.tokens[0] == tokenizer.token_id("<|im_start|>")).nonzero()[:, 0]
    has_system = bool(references) or system_turn or bool(caption)
    prefix_len = int(starts[1]) if has_system else 0  # where the user turn begins
    return Request(prompt.tokens, prefix_len=prefix_len, **fields)


# -------------------------------------------------------------------------------------- prefix cache


class PrefixCache:
    """Prompt prefix (its tokens) -> its slow keys and values (L, Hkv, P, Dh), least recently used evicted
    beyond ``max_bytes``. The entries belong to the weights they were computed with: ``clear()`` after
    changing the model's weights (a GRPO update)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[bytes, tuple[Tensor, Tensor]] = OrderedDict()
        self.bytes = self.hits = self.misses = self.evictions = 0

    @staticmethod
    def key(tokens_RP: Tensor) -> bytes:
        data = tokens_RP.detach().to("cpu", torch.int64).contiguous()
        return hashlib.sha256(str(tuple(data.shape)).encode() + data.numpy().tobytes()).digest()

    def get(self, key: bytes) -> tuple[Tensor, Tensor] | None:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return entry

    def put(self, key: bytes, k: Tensor, v: Tensor) -> None:
        size = k.nbytes + v.nbytes
        if size > self.max_bytes or key in self.entries:
            return
        while self.bytes + size > self.max_bytes:
            _, (old_k, old_v) = self.entries.popitem(last=False)
            self.bytes -= old_k.nbytes + old_v.nbytes
            self.evictions += 1
        self.entries[key] = (k, v)
        self.bytes += size

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


# -------------------------------------------------------------------------------------------- engine


@dataclass
class _Running:
    """The host-side state of a request that holds a row."""

    index: int
    request: Request
    generator: torch.Generator | None
    prefix_hit: bool
    columns: list[Tensor] = field(default_factory=list)
    slow_logprobs: list[Tensor] = field(default_factory=list)
    fast_logprobs: list[Tensor] = field(default_factory=list)


class _Batch:
    """The device state of the running batch: caches, sampler rows, the next slow logits, frame outputs."""

    def __init__(self, model: DualAR, vocab: SlowVocab, rows: int, capacity: int, static: bool):
        cfg, device = model.config, model.slow.embeddings.weight.device
        self.rows = rows
        self.cache = model.new_row_cache(rows, capacity, static=static)
        self.fast_cache = model.new_fast_cache(rows)
        self.sampler = RowSampler(rows, device)
        self.noise = FrameNoise(rows, vocab, device)
        self.allow_end = torch.ones(rows, dtype=torch.bool, device=device)
        self.hidden = model.slow.embeddings.weight.new_zeros(rows, cfg.dim)  # (N, D) of the last position
        self.logits = torch.zeros(rows, vocab.size, device=device)  # (N, A) of the last position
        self.columns = torch.zeros(rows, 1 + cfg.num_codebooks, dtype=torch.long, device=device)
        self.slow_logprobs = torch.zeros(rows, device=device)
        self.fast_logprobs = torch.zeros(rows, cfg.num_codebooks - 1, device=device)
        self.running: list[_Running] = []  # row i holds running[i]
        self.graph: torch.cuda.CUDAGraph | Callable[[], None] | None = None  # the fixed-shape step
        self.decoder: StepDecoder | None = None  # the eager step's model path (None: the modules)
        self.head: Tensor | None = None  # (D, A): the allowed rows of the LM head, for the eager step

    def move_row(self, source: int, target: int) -> None:
        length = int(self.cache.lengths[source])
        self.cache.k[:, target, :, :length] = self.cache.k[:, source, :, :length]
        self.cache.v[:, target, :, :length] = self.cache.v[:, source, :, :length]
        for tensor in (self.cache.lengths, self.allow_end, self.hidden, self.logits, self.noise.values):
            tensor[target] = tensor[source]
        self.sampler.move_row(source, target)


class RequestFeed(Protocol):
    """Where ``InferenceEngine.run_feed`` takes its requests from: a fixed list (``ListFeed``) or a server's
    queue of live requests (``s2train.serving.live``)."""

    def take(self, n: int, wait: bool) -> list[tuple[int, Request]]:
        """Up to ``n`` (index, request) pairs; ``wait``: nothing is running, so block until a request
        comes or the feed is exhausted."""
        ...

    def cancelled(self, index: int) -> bool:
        """Whether the request ``index`` was withdrawn (its row is then freed)."""
        ...

    def exhausted(self) -> bool:
        """No request will come any more."""
        ...


class ListFeed:
    """The requests of a list, indexed by their place in it."""

    def __init__(self, requests: Sequence[Request]):
        self.queue = deque(enumerate(requests))

    def take(self, n: int, wait: bool) -> list[tuple[int, Request]]:
        return [self.queue.popleft() for _ in range(min(n, len(self.queue)))]

    def cancelled(self, index: int) -> bool:
        return False

    def exhausted(self) -> bool:
        return not self.queue


class InferenceEngine:
    """Generation for lists of ``Request`` with one Dual-AR model (module docstring)."""

    def __init__(
        self,
        model: DualAR,
        im_end_id: int,
        *,
        max_batch: int = 8,
        prefix_cache_mb: float = 256.0,
        cuda_graph: bool | None = None,
        compile: bool = False,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.model = model.eval()
        self.config = model.config
        self.device = model.slow.embeddings.weight.device
        self.vocab = SlowVocab.of(model.config, im_end_id, self.device)
        self.max_batch = max_batch
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20))
        on_cuda = self.device.type == "cuda"
        self.cuda_graph = on_cuda if cuda_graph is None else cuda_graph
        if self.cuda_graph and not on_cuda:
            raise ValueError("cuda_graph needs the model on a CUDA device")
        if compile and on_cuda:
            raise ValueError("compile is the CPU's fixed-shape step; on CUDA use cuda_graph")
        self.compile = compile
        # Both speed paths run one fixed-shape step over all rows of a static cache (every slot, masked).
        self.static = self.cuda_graph or compile
        self.first_frame_s: dict[int, float] = {}  # request index -> seconds from run() to its first column
        self._last_batch: _Batch | None = None

    # ---------------------------------------------------------------------------------------- public

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        """Every request's generation, in the order given."""
        results: list[Generation | None] = [None] * len(requests)
        for step in self.run(requests):
            if step.done is not None:
                results[step.index] = step.done
        return results  # type: ignore[return-value]

    def run(self, requests: Sequence[Request]) -> Iterator[Step]:
        """Generate ``requests`` with continuous batching, yielding every column as it is made."""
        if not requests:
            return
        for request in requests:
            self.check(request)
        need = max(r.prompt.shape[1] + r.max_new_tokens for r in requests)
        yield from self.run_feed(ListFeed(requests), min(self.max_batch, len(requests)), need)

    @torch.no_grad()
    def run_feed(self, feed: RequestFeed, rows: int, slots: int) -> Iterator[Step]:
        """Generate what ``feed`` gives, yielding every column as it is made: a free row takes the feed's
        next request before each frame (a request that arrives while others generate joins the running
        batch at the next frame), a row the feed cancels is freed at the next frame, and the run ends
        when the feed has no more and no row is running. ``rows`` x ``slots``: the batch's size (every
        request must fit ``slots``: prompt plus ``max_new_tokens``; ``check`` it before it is fed)."""
        batch = self._batch_for(rows, slots)
        if not self.static:  # read the weights as they are now (a GRPO update changes them)
            batch.decoder = StepDecoder(self.model, batch.cache.max_len)
            batch.head = self._head().index_select(0, self.vocab.allowed_ids).t()  # (D, A)
        started = time.perf_counter()
        self.first_frame_s = {}
        while True:
            free = batch.rows - len(batch.running)
            for index, request in feed.take(free, wait=not batch.running) if free else ():
                self._join(batch, index, request)
            self._leave(batch, [row for row, run in enumerate(batch.running) if feed.cancelled(run.index)])
            if not batch.running:
                if feed.exhausted():
                    return
                continue
            n = len(batch.running)
            for row, run in enumerate(batch.running):
                if run.generator is not None:
                    batch.noise.fill(row, run.generator)
            self._frame(batch, n)
            columns = batch.columns[:n].to("cpu", copy=True)  # the buffers are overwritten next frame
            if batch.sampler.logprobs:
                slow_lp = batch.slow_logprobs[:n].to("cpu", copy=True)
                fast_lp = batch.fast_logprobs[:n].to("cpu", copy=True)
            finished = []
            for row, run in enumerate(batch.running):
                if not run.columns:
                    self.first_frame_s[run.index] = time.perf_counter() - started
                column = columns[row]
                run.columns.append(column)
                if run.request.sampling.exact:
                    run.slow_logprobs.append(slow_lp[row])
                    run.fast_logprobs.append(fast_lp[row])
                ended = int(column[0]) == self.vocab.im_end_id
                if len(run.columns) == run.request.min_new_tokens:
                    batch.allow_end[row] = True
                done = (
                    self._result(run, ended)
                    if ended or len(run.columns) >= run.request.max_new_tokens
                    else None
                )
                if done is not None:
                    finished.append(row)
                yield Step(run.index, column, done)
            self._leave(batch, finished)

    def check(self, request: Request) -> None:
        """Refuse a request this model cannot generate (prompt shape, lengths), with the reason."""
        cfg = self.config
        prompt = request.prompt
        if prompt.dim() != 2 or prompt.shape[0] != 1 + cfg.num_codebooks or prompt.shape[1] < 1:
            raise ValueError(
                f"a request's prompt must be (1 + K, T) with K = {cfg.num_codebooks} and T >= 1, "
                f"not {tuple(prompt.shape)}"
            )
        if not 1 <= request.max_new_tokens:
            raise ValueError(f"max_new_tokens must be at least 1, not {request.max_new_tokens}")
        if not 0 <= request.min_new_tokens <= request.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be between 0 and max_new_tokens ({request.max_new_tokens}), "
                f"not {request.min_new_tokens}"
            )
        if not 0 <= request.prefix_len < prompt.shape[1]:
            raise ValueError(
                f"prefix_len must be below the prompt's {prompt.shape[1]} positions, not {request.prefix_len}"
            )
        if prompt.shape[1] + request.max_new_tokens > cfg.max_seq_len:
            raise ValueError(
                f"a {prompt.shape[1]}-position prompt plus {request.max_new_tokens} new frames exceeds the "
                f"model's max_seq_len {cfg.max_seq_len}"
            )

    # --------------------------------------------------------------------------------------- internals

    def _leave(self, batch: _Batch, rows: list[int]) -> None:
        """Free ``rows`` (ascending): each is filled with the last running row, so the running rows stay
        rows 0..N-1."""
        for row in reversed(rows):
            last = len(batch.running) - 1
            if row != last:
                batch.move_row(last, row)
                batch.running[row] = batch.running[last]
            batch.running.pop()
        if rows and self.static:
            batch.cache.lengths[len(batch.running) :] = 0  # idle rows of the step write harmlessly

    def _batch_for(self, rows: int, need: int) -> _Batch:
        """The running batch of ``rows`` rows for requests of up to ``need`` positions: the last run's if it
        has the same rows and slots (its CUDA graph is then replayed as it is), else a new one. Slots are
        rounded up to a multiple of ``SLOT_QUANTUM`` so that runs of similar lengths share a batch."""
        capacity = min(-(-need // SLOT_QUANTUM) * SLOT_QUANTUM, self.config.max_seq_len)
        last = self._last_batch
        if last is not None and (last.rows, last.cache.max_len) == (rows, capacity):
            last.running.clear()
            return last
        self._last_batch = None  # free its memory before allocating the new one
        self._last_batch = _Batch(self.model, self.vocab, rows, capacity, self.static)
        return self._last_batch

    def _head(self) -> Tensor:
        slow = self.model.slow
        return (slow.embeddings.weight if slow.output is None else slow.output.weight).detach()

    def allowed_logits(self, hidden_ND: Tensor, head_DA: Tensor | None = None) -> Tensor:
        """Slow logits (N, A) of the allowed tokens, in id order, from the slow output (N, D): the rows of
        the LM head that S2 decoding may choose, not the whole vocabulary. ``head_DA``: those rows,
        gathered and transposed once per run (the eager step: one matrix product a frame)."""
        if head_DA is not None:
            logits = torch.mm(hidden_ND, head_DA)
        else:
            cfg, vocab = self.config, self.vocab
            weight = self._head()
            semantic = F.linear(hidden_ND, weight[cfg.semantic_begin_id : cfg.semantic_end_id + 1])
            end = F.linear(hidden_ND, weight[vocab.im_end_id : vocab.im_end_id + 1])
            logits = torch.cat([end, semantic] if vocab.end_index == 0 else [semantic, end], dim=-1)
        return logits if logits.dtype == torch.float32 else logits.float()

    def _join(self, batch: _Batch, index: int, request: Request) -> None:
        """Run ``request``'s prompt into the next free row (its prefix from the prefix cache if held)."""
        row = len(batch.running)
        cache = batch.cache
        view = cache.rows(row, row + 1)
        view.static = False  # a prompt attends to its own slots only
        view.lengths.zero_()
        prompt = request.prompt.to(self.device)
        start, key = 0, None
        if request.prefix_len:
            key = PrefixCache.key(prompt[:, : request.prefix_len])
            entry = self.prefix_cache.get(key)
            if entry is not None:
                start = request.prefix_len
                cache.k[:, row, :, :start], cache.v[:, row, :, :start] = entry
                view.lengths.fill_(start)
        model = self.model
        hidden = model.slow(model.slow.embed(prompt[None, :, start:]), cache=view)[:, -1]  # (1, D)
        if key is not None and start == 0:
            p = request.prefix_len
            self.prefix_cache.put(key, cache.k[:, row, :, :p].clone(), cache.v[:, row, :, :p].clone())
        batch.hidden[row] = hidden[0]
        batch.logits[row] = self.allowed_logits(hidden, batch.head)[0]
        batch.sampler.set_row(row, request.sampling)
        batch.allow_end[row] = request.min_new_tokens == 0
        generator = None
        if request.sampling.sampled:
            seed = request.seed if request.seed is not None else int(torch.randint(2**62, ()).item())
            generator = torch.Generator(self.device).manual_seed(seed)
        batch.running.append(_Running(index, request, generator, prefix_hit=start > 0))

    def _frame(self, batch: _Batch, n: int) -> None:
        """One frame for rows 0..n-1: the CUDA graph or the compiled step of all rows, or an eager step of
        the running ones."""
        if self.compile:
            if batch.graph is None:
                batch.graph = self._compiled(batch)
            with torch.inference_mode():
                batch.graph()
            return
        if not self.cuda_graph:
            # Inference mode skips the autograd bookkeeping of every small op (about a fifth of an eager
            # step on a CPU); the step only writes into the batch's buffers, which stay normal tensors.
            with torch.inference_mode():
                self._step(batch, n)
            return
        if batch.graph is None:
            batch.graph = self._capture(batch)
        batch.graph.replay()

    def _step(self, batch: _Batch, n: int) -> None:
        """Draw a frame for rows 0..n-1 from their slow logits, then run the new columns through the slow
        model to get the next slow logits. Fixed shapes for a given n; no host synchronisation."""
        model, decoder = self.model, batch.decoder
        full = n == batch.rows  # every row runs: the buffers themselves, not views of their first n rows
        hidden = batch.hidden if full else batch.hidden[:n]
        fast_cache = batch.fast_cache if full else batch.fast_cache.rows(0, n)

        def fast_logits(k: int, codes: Tensor) -> Tensor:
            if decoder is not None:
                if k == 1:
                    return decoder.fast_first(hidden, codes[:, 0], fast_cache)
                return decoder.fast_next(codes[:, k - 1], k, fast_cache)
            if k == 1:  # [hidden, E(c0)] at fast positions 0, 1: output 1 predicts c1
                fast_cache.reset()
                return model.fast_step(model.fast_inputs(hidden, codes[:, :1]), fast_cache)[:, 1]
            return model.fast_step(model.fast_embed(codes[:, k - 1 : k], k - 1), fast_cache)[:, 0]

        frame = decode_frame(
            batch.logits if full else batch.logits[:n],
            fast_logits,
            batch.sampler if full else batch.sampler.rows(n),
            batch.noise,
            self.vocab,
            batch.allow_end if full else batch.allow_end[:n],
        )
        cache = batch.cache if full else batch.cache.rows(0, n)
        if decoder is not None:
            out = decoder.slow_step(frame.columns, cache)
        else:
            out = model.slow(model.slow.embed(frame.columns[:, :, None]), cache=cache)[:, 0]
        hidden.copy_(out)
        (batch.logits if full else batch.logits[:n]).copy_(self.allowed_logits(out, batch.head))
        (batch.columns if full else batch.columns[:n]).copy_(frame.columns)
        if batch.sampler.logprobs:
            batch.slow_logprobs[:n] = frame.slow_logprob
            batch.fast_logprobs[:n] = frame.fast_logprob

    @staticmethod
    def _fixed_sampler(batch: _Batch) -> None:
        """The sampler of a fixed-shape step: every branch taken, nothing read on the host, so that one
        recorded step serves every request's settings."""
        sampler = batch.sampler
        sampler.truncating, sampler.logprobs, sampler.eager = True, True, False

    def _compiled(self, batch: _Batch) -> Callable[[], None]:
        """``_step`` over all rows, compiled by ``torch.compile`` (inductor, generating C++ with a C++
        wrapper, so a frame makes a handful of calls from Python instead of hundreds of small ATen calls).
        It compiles on its first call (a minute or two on a small CPU) and again for a batch of other rows
        or slots; the numbers are the eager module path's up to the reassociation of float sums. Dynamo
        keeps at most ``torch._dynamo.config.recompile_limit`` (8) compiled shapes of the step: a
        long-lived engine that meets more batch shapes should raise it."""
        self._fixed_sampler(batch)
        return torch.compile(
            functools.partial(self._step, batch, batch.rows),
            dynamic=False,
            fullgraph=True,
            options={"cpp_wrapper": True},
        )

    def _capture(self, batch: _Batch) -> torch.cuda.CUDAGraph:  # pragma: no cover - needs CUDA
        """Record ``_step`` over all rows as a CUDA graph. Warm-up runs change the state they run on, so
        it is saved first and put back afterwards; capture itself runs nothing."""
        self._fixed_sampler(batch)
        state = (batch.cache.lengths, batch.sampler.history, batch.hidden, batch.logits)
        saved = [t.clone() for t in state]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(batch, batch.rows)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(batch, batch.rows)
        for tensor, copy in zip(state, saved):
            tensor.copy_(copy)
        return graph

    def _result(self, run: _Running, stopped: bool) -> Generation:
        tokens = torch.stack(run.columns, dim=1)
        slow = fast = None
        if run.request.sampling.exact:
            frames = len(run.columns) - int(stopped)
            slow, fast = torch.stack(run.slow_logprobs), torch.stack(run.fast_logprobs)[:frames]
        return Generation(tokens, stopped, slow, fast, run.prefix_hit)


# ----------------------------------------------------------------------------------------- streaming


@dataclass
class AudioChunk:
    index: int  # the request's place in the list
    audio: Tensor  # (samples,) float32 on the CPU, at the codec's sample rate
    final: bool  # the request's last chunk
    generation: Generation | None  # set on the last chunk


class RequestAudio:
    """One request's frames decoded to audio as they come, through its own causal streaming decoder
    (``Codec.stream_decoder``): a chunk after ``first_chunk_frames`` frames, then every ``chunk_frames``,
    and the rest when it ends; its chunks joined equal ``codec.decode`` of all its frames."""

    def __init__(self, codec: Codec, im_end_id: int, first_chunk_frames: int = 8, chunk_frames: int = 32):
        if first_chunk_frames < 1 or chunk_frames < 1:
            raise ValueError("first_chunk_frames and chunk_frames must be at least 1")
        self.codec, self.im_end_id = codec, im_end_id
        self.first_chunk_frames, self.chunk_frames = first_chunk_frames, chunk_frames
        self.decoder = codec.stream_decoder()
        self.pending: list[Tensor] = []
        self.frames = 0  # decoded so far

    @torch.no_grad()
    def push(self, step: Step) -> AudioChunk | None:
        """The next chunk when ``step`` completes one (always on the request's last step), else None."""
        if int(step.column[0]) != self.im_end_id:
            self.pending.append(step.column[1:])
        wanted = self.first_chunk_frames if self.frames == 0 else self.chunk_frames
        if len(self.pending) < wanted and step.done is None:
            return None
        device = next(self.codec.parameters()).device
        codes = (
            torch.stack(self.pending, dim=1)
            if self.pending
            else torch.zeros(len(step.column) - 1, 0, dtype=torch.long)
        )
        audio = self.decoder.push(codes.long().to(device))[0, 0].float().cpu()
        self.frames += len(self.pending)
        self.pending = []
        final = step.done is not None
        if final:
            tail = self.decoder.flush()  # what the decoder held back (the istft decoder's last hop)
            if tail is not None:
                audio = torch.cat([audio, tail[0, 0].float().cpu()])
        return AudioChunk(step.index, audio, final, step.done)


def stream_audio(
    engine: InferenceEngine,
    codec: Codec,
    requests: Sequence[Request],
    *,
    first_chunk_frames: int = 8,
    chunk_frames: int = 32,
) -> Iterator[AudioChunk]:
    """Generate ``requests`` and decode each one's frames to audio as they come (``RequestAudio``)."""
    if first_chunk_frames < 1 or chunk_frames < 1:
        raise ValueError("first_chunk_frames and chunk_frames must be at least 1")
    check_codec(engine, codec)
    streams: dict[int, RequestAudio] = {}
    for step in engine.run(requests):
        if step.index not in streams:
            streams[step.index] = RequestAudio(
                codec, engine.vocab.im_end_id, first_chunk_frames, chunk_frames
            )
        chunk = streams[step.index].push(step)
        if chunk is not None:
            if chunk.final:
                del streams[step.index]
            yield chunk


def check_codec(engine: InferenceEngine, codec: Codec) -> None:
    """The codec decodes every codebook the engine's model generates."""
    if codec.config.n_codebooks < engine.config.num_codebooks:
        raise ValueError(
            f"the codec has {codec.config.n_codebooks} codebooks but the model generates "
            f"{engine.config.num_codebooks}"
        )
