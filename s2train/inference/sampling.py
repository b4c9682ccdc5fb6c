"""Samplers and S2's per-frame decoding rule, shared by the naive loop and the inference engine.

Shape legend: N rows (requests of a batch), V vocabulary (or codebook) size, A allowed slow tokens (the
C semantic tokens and ``<|im_end|>``, in id order), K codebooks, C codebook size.

**Drawing a token** (``draw``), in upstream's order: sort; drop the tokens after the cumulative
probability of the untempered distribution exceeds ``top_p`` (the first is always kept); keep at most
``top_k``; divide by the temperature; softmax; then the argmax of ``p / q`` with ``q ~ Exp(1)`` drawn
independently per token, which is an exact draw from ``p`` (the exponential race). The noise ``q`` is an
input, in vocabulary order, so that

- each request draws from its own generator (``FrameNoise``): its tokens do not depend on which other
  requests share its batch, and the same seed gives the same tokens alone, batched or in the naive loop;
- a step has no host round trip and fixed shapes (CUDA graphs);
- truncation or none, the same noise picks the same token wherever the distributions agree.

Temperature 0 is greedy (the argmax, no noise). ``top_k=1`` is greedy at any temperature.

**A frame** (``decode_frame``, upstream ``decode_one_token_ar``): the slow logits are restricted to the
semantic tokens and ``<|im_end|>`` (``SlowVocab``); the slow token is drawn, and replaced by a second draw
at ``ras_temperature`` / ``ras_top_p`` (same ``top_k``) when it is semantic and occurs among the
request's last ``ras_window`` slow tokens (repetition-aware sampling; off for greedy rows); c0 = token -
semantic_begin (clamped); then c1 .. c_{K-1} are drawn one after another from the fast model with the fast
parameters. An ``<|im_end|>`` column carries zero codes.

**Exact mode** (``SamplingParams.exact_at``, for reinforcement learning): no truncation and no
repetition-aware replacement, so every token is an exact draw from ``softmax(logits / T)`` (slow logits
restricted to the allowed tokens, as always), and the log-probability of each drawn slow token and code
under that distribution is returned: what the training forward gives for the same tokens with
``log_softmax(masked_logits / T)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from s2train.checks import check

# The most recent slow tokens a row remembers for repetition-aware sampling (ras_window is at most this).
MAX_RAS_WINDOW = 64


def allowed_slow_tokens(
    vocab_size: int, semantic_begin_id: int, semantic_end_id: int, im_end_id: int
) -> Tensor:
    """Bool (V,): the tokens S2 decoding may emit in an assistant voice turn: semantic tokens and <|im_end|>."""
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    allowed[semantic_begin_id : semantic_end_id + 1] = True
    allowed[im_end_id] = True
    return allowed


# ------------------------------------------------------------------------------------------ parameters


@dataclass
class SamplingParams:
    """How one request draws its slow tokens and codes. Temperature 0 is greedy; ``None`` turns a cut off.
    (Also the ``synthesize.sampling`` config block, hence not frozen: treat it as a value.)

    The defaults are a sampling setting in S2's style (temperature 0.7, top-p 0.9 for both models,
    repetition-aware sampling over the last 10 slow tokens at temperature 1.0, top-p 0.9).
    """

    temperature: float = 0.7  # slow token
    top_p: float | None = 0.9
    top_k: int | None = None
    fast_temperature: float = 0.7  # residual codes c1 .. c_{K-1}
    fast_top_p: float | None = 0.9
    fast_top_k: int | None = None
    ras_window: int = 10  # repetition-aware sampling over this many previous slow tokens; 0: off
    ras_temperature: float = 1.0
    ras_top_p: float | None = 0.9
    exact: bool = False  # RL: untruncated softmax, log-probabilities returned (see exact_at)

    def __post_init__(self) -> None:
        for prefix in ("", "fast_", "ras_"):
            temperature = getattr(self, f"{prefix}temperature")
            top_p = getattr(self, f"{prefix}top_p")
            check(temperature >= 0, f"sampling {prefix}temperature must be >= 0, not {temperature}")
            check(top_p is None or 0 < top_p <= 1, f"sampling {prefix}top_p must be in (0, 1], not {top_p}")
        for name in ("top_k", "fast_top_k"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"sampling {name} must be at least 1, not {value}")
        check(
            0 <= self.ras_window <= MAX_RAS_WINDOW,
            f"sampling ras_window must be between 0 and {MAX_RAS_WINDOW}, not {self.ras_window}",
        )
        if self.exact:
            check(
                self.temperature > 0 and self.fast_temperature > 0,
                "exact sampling needs temperatures above 0 (it draws from softmax(logits / T))",
            )
            check(
                self.top_p is None
                and self.top_k is None
                and self.fast_top_p is None
                and self.fast_top_k is None
                and self.ras_window == 0,
                "exact sampling draws from the untruncated softmax: top_p, top_k, fast_top_p and fast_top_k "
                "must be None and ras_window 0",
            )

    @classmethod
    def greedy(cls) -> SamplingParams:
        """The argmax of every slow token and code (deterministic)."""
        return cls(0.0, None, None, 0.0, None, None, ras_window=0)

    @classmethod
    def exact_at(cls, temperature: float, fast_temperature: float | None = None) -> SamplingParams:
        """Exact draws from the untruncated softmax at ``temperature`` (and ``fast_temperature``, default
        the same) with the log-probability of every drawn token: what reinforcement learning needs."""
        fast = temperature if fast_temperature is None else fast_temperature
        return cls(temperature, None, None, fast, None, None, ras_window=0, exact=True)

    @property
    def sampled(self) -> bool:
        """Whether any draw is random (so the request consumes noise)."""
        return (self.temperature > 0 and self.top_k != 1) or (
            self.fast_temperature > 0 and self.fast_top_k != 1
        )


# --------------------------------------------------------------------------------------------- drawing


def truncate(logits_NV: Tensor, top_p: Tensor, top_k: Tensor) -> Tensor:
    """Logits (N, V) with the tokens that top-p (N,) and top-k (N,) cut set to -inf, in vocabulary order.

    Per row: sort; drop where the cumulative probability of the untempered softmax exceeds top_p (a top_p
    above 1 cuts nothing); drop ranks >= top_k; the best token is always kept.
    """
    sorted_logits, order = logits_NV.sort(dim=-1, descending=True)  # (N, V)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    ranks = torch.arange(logits_NV.shape[-1], device=logits_NV.device)
    drop = (cumulative > top_p[:, None]) | (ranks[None, :] >= top_k[:, None])
    drop[:, 0] = False
    return torch.empty_like(logits_NV).scatter_(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


def draw(logits_NV: Tensor, temperature: Tensor, noise_NV: Tensor) -> Tensor:
    """One token per row (N,): argmax of softmax(logits / T) / noise, or the argmax where T is 0."""
    probs = (logits_NV / temperature.clamp_min(1e-5)[:, None]).softmax(-1)
    return torch.where(temperature > 0, (probs / noise_NV).argmax(-1), logits_NV.argmax(-1))


def log_prob(logits_NV: Tensor, temperature: Tensor, tokens_N: Tensor) -> Tensor:
    """log softmax(logits / T) of the given tokens (N,), in float32."""
    logp = (logits_NV / temperature.clamp_min(1e-5)[:, None]).log_softmax(-1)
    return logp.gather(-1, tokens_N[:, None]).squeeze(-1)


def sample(
    logits_NV: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token per row (N,) from logits (N, V) with one setting for every row (``draw`` after
    ``truncate``), the noise drawn from ``generator``."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, not {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, not {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], not {top_p}")
    if temperature == 0:
        return logits_NV.argmax(-1)
    N, V = logits_NV.shape
    full = lambda value: torch.full((N,), value, device=logits_NV.device)  # noqa: E731
    logits = truncate(logits_NV.float(), full(2.0 if top_p is None else top_p), full(top_k or V))
    noise = torch.empty_like(logits).exponential_(generator=generator)
    return draw(logits, full(float(temperature)), noise)


# ------------------------------------------------------------------------------------ the frame rule


@dataclass(frozen=True)
class SlowVocab:
    """What the frame rule needs of the model's vocabulary: the allowed slow token ids (A,) in id order
    (semantic tokens and <|im_end|>) and where <|im_end|> sits among them."""

    allowed_ids: Tensor  # (A,)
    end_index: int  # allowed_ids[end_index] == im_end_id
    im_end_id: int
    semantic_begin_id: int
    codebook_size: int  # C
    num_codebooks: int  # K
    first_codes: Tensor  # (A,): c0 of each allowed token, clamp(id - semantic_begin_id, 0, C - 1)

    @classmethod
    def of(cls, config, im_end_id: int, device: torch.device | str = "cpu") -> SlowVocab:
        """From a ``DualARConfig`` and the tokenizer's <|im_end|> id."""
        if config.is_semantic(torch.tensor(im_end_id)):
            raise ValueError(f"<|im_end|> ({im_end_id}) cannot be a semantic token id")
        allowed = allowed_slow_tokens(
            config.vocab_size, config.semantic_begin_id, config.semantic_end_id, im_end_id
        )
        ids = allowed.nonzero()[:, 0]
        end_index = int((ids == im_end_id).nonzero()[0, 0])
        first_codes = (ids - config.semantic_begin_id).clamp(0, config.codebook_size - 1)
        return cls(
            ids.to(device),
            end_index,
            im_end_id,
            config.semantic_begin_id,
            config.codebook_size,
            config.num_codebooks,
            first_codes.to(device),
        )

    @property
    def size(self) -> int:
        return len(self.allowed_ids)

    def noise_width(self) -> int:
        """Noise values one frame of one row consumes: slow draw, its RAS redraw, K - 1 codes."""
        return 2 * self.size + (self.num_codebooks - 1) * self.codebook_size


class FrameNoise:
    """Exp(1) noise for one frame of N rows, each row drawn from its request's own generator.

    Greedy rows keep ones and draw nothing. Layout of a row: the slow draw (A), the repetition-aware
    redraw (A), then one block of C per code c1 .. c_{K-1}.
    """

    def __init__(self, rows: int, vocab: SlowVocab, device: torch.device | str):
        self.vocab = vocab
        self.values = torch.ones(rows, vocab.noise_width(), device=device)  # (N, 2A + (K-1)C)

    def fill(self, row: int, generator: torch.Generator) -> None:
        self.values[row].exponential_(generator=generator)

    def parts(self, rows: int) -> tuple[Tensor, Tensor, Tensor]:
        """Views of the first ``rows`` rows: slow (n, A), redraw (n, A), codes (n, K - 1, C)."""
        a, v = self.vocab.size, self.values[:rows]
        return v[:, :a], v[:, a : 2 * a], v[:, 2 * a :].unflatten(-1, (self.vocab.num_codebooks - 1, -1))


class RowSampler:
    """The sampling parameters of every row of a running batch as tensors (N,), and each row's recent slow
    tokens for repetition-aware sampling. ``set_row`` when a request takes a row, ``move_row`` when the
    batch is compacted; ``rows(n)`` is a view of the first n rows.

    A frame of a small model is bound by the number of tensor operations, so the draws take few: each
    row's temperature divisors (``clamp_min(1e-5)``) and repetition window are made in ``set_row``, and
    flags known on the host skip what no row needs (the top-k cut, the greedy branch, the redraw when
    nothing repeats). The numbers are those of ``truncate`` and ``draw``.
    """

    def __init__(self, rows: int, device: torch.device | str):
        f = lambda value=0.0: torch.full((rows,), value, device=device)  # noqa: E731
        self.temperature, self.top_p, self.top_k = f(), f(2.0), f(1e9)
        self.fast_temperature, self.fast_top_p, self.fast_top_k = f(), f(2.0), f(1e9)
        self.ras_temperature, self.ras_top_p = f(1.0), f(2.0)
        # (N, 1) temperature.clamp_min(1e-5): what ``draw`` divides the logits by.
        self.divisor, self.fast_divisor, self.ras_divisor = (f(1e-5)[:, None] for _ in range(3))
        self.ras_window = torch.zeros(rows, dtype=torch.long, device=device)
        # The slots of history that a row's repetition window covers (its first ras_window).
        self.ras_slots = torch.zeros(rows, MAX_RAS_WINDOW, dtype=torch.bool, device=device)
        self.history = torch.full((rows, MAX_RAS_WINDOW), -1, dtype=torch.long, device=device)  # newest first
        # Whether any row needs truncation, or log-probabilities, at all: False skips that work (eager speed
        # only; the tokens are the same either way). ``eager``: tensors may be read on the host to skip
        # work. A CUDA graph is captured with truncating and logprobs True and eager False.
        self.truncating = False
        self.logprobs = False
        self.eager = True
        # Whether any row has set a top-k cut, a greedy draw (temperature 0), a random one (eager only).
        self.top_k_cut = self.greedy = self.random = False
        self._constants: dict[int, tuple[Tensor, Tensor]] = {}  # V -> (ranks (V,), all but the first (V,))
        self._minus_inf = torch.tensor(float("-inf"), device=device)

    _FIELDS = (
        "temperature",
        "top_p",
        "top_k",
        "fast_temperature",
        "fast_top_p",
        "fast_top_k",
        "ras_temperature",
        "ras_top_p",
        "divisor",
        "fast_divisor",
        "ras_divisor",
        "ras_window",
        "ras_slots",
        "history",
    )
    _FLAGS = ("truncating", "logprobs", "eager", "top_k_cut", "greedy", "random", "_constants", "_minus_inf")

    def rows(self, n: int) -> RowSampler:
        view = object.__new__(RowSampler)
        for name in self._FIELDS:
            setattr(view, name, getattr(self, name)[:n])
        for name in self._FLAGS:
            setattr(view, name, getattr(self, name))
        return view

    def set_row(self, row: int, params: SamplingParams) -> None:
        cut = lambda value: 2.0 if value is None else value  # noqa: E731  a top-p above 1 cuts nothing
        self.temperature[row], self.top_p[row] = params.temperature, cut(params.top_p)
        self.top_k[row] = params.top_k or 1e9
        self.fast_temperature[row], self.fast_top_p[row] = params.fast_temperature, cut(params.fast_top_p)
        self.fast_top_k[row] = params.fast_top_k or 1e9
        self.ras_temperature[row], self.ras_top_p[row] = params.ras_temperature, cut(params.ras_top_p)
        for divisor, temperature in (
            (self.divisor, self.temperature),
            (self.fast_divisor, self.fast_temperature),
            (self.ras_divisor, self.ras_temperature),
        ):
            divisor[row] = temperature[row].clamp_min(1e-5)
        self.ras_window[row] = params.ras_window if params.temperature > 0 else 0
        self.ras_slots[row] = torch.arange(MAX_RAS_WINDOW, device=self.history.device) < self.ras_window[row]
        self.history[row] = -1
        cuts = (params.top_p, params.top_k, params.fast_top_p, params.fast_top_k)
        self.truncating |= any(value is not None for value in cuts) or params.ras_window > 0
        self.logprobs |= params.exact
        self.top_k_cut |= params.top_k is not None or params.fast_top_k is not None
        temperatures = (params.temperature, params.fast_temperature, params.ras_temperature)
        self.greedy |= any(t == 0 for t in temperatures)
        self.random |= any(t > 0 for t in temperatures)

    def move_row(self, source: int, target: int) -> None:
        for name in self._FIELDS:
            tensor = getattr(self, name)
            tensor[target] = tensor[source]

    def _cut(self, logits: Tensor, top_p: Tensor, top_k: Tensor) -> Tensor:
        """``truncate`` (the same numbers), skipping the top-k cut where no row has one."""
        if not self.truncating:
            return logits
        if not self.eager:
            return truncate(logits, top_p, top_k)
        V = logits.shape[-1]
        if V not in self._constants:
            ranks = torch.arange(V, device=logits.device)
            self._constants[V] = (ranks, ranks > 0)
        ranks, not_first = self._constants[V]
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (N, V)
        drop = sorted_logits.softmax(-1).cumsum(-1) > top_p[:, None]
        if self.top_k_cut:
            drop |= ranks >= top_k[:, None]
        drop &= not_first  # the best token is always kept
        return torch.empty_like(logits).scatter_(-1, order, sorted_logits.masked_fill(drop, self._minus_inf))

    def _draw(self, logits: Tensor, temperature: Tensor, divisor: Tensor, noise: Tensor) -> Tensor:
        """``draw`` (the same tokens), skipping the branch that no row takes."""
        if self.eager and not self.random:
            return logits.argmax(-1)
        sampled = ((logits / divisor).softmax(-1) / noise).argmax(-1)
        if self.eager and not self.greedy:
            return sampled
        return torch.where(temperature > 0, sampled, logits.argmax(-1))

    def _log_prob(self, logits: Tensor, temperature: Tensor, tokens: Tensor) -> Tensor | None:
        return log_prob(logits, temperature, tokens) if self.logprobs else None  # None: zeros (decode_frame)

    def slow(
        self, logits_NA: Tensor, noise: Tensor, redraw_noise: Tensor, vocab: SlowVocab
    ) -> tuple[Tensor, Tensor | None]:
        """Index among the allowed tokens (N,) and its log-probability (N,) from logits (N, A) (None
        without ``logprobs``)."""
        logits = logits_NA if logits_NA.dtype == torch.float32 else logits_NA.float()
        index = self._draw(self._cut(logits, self.top_p, self.top_k), self.temperature, self.divisor, noise)
        seen = (self.history == index[:, None]) & self.ras_slots  # (N, 64): the token among the last ones
        if not self.eager or bool(seen.any()):  # eager: no redraw when nothing repeats
            repeated = seen.any(-1) & (index != vocab.end_index)
            cut = self._cut(logits, self.ras_top_p, self.top_k)
            redraw = self._draw(cut, self.ras_temperature, self.ras_divisor, redraw_noise)
            index = torch.where(repeated, redraw, index)
        self.history.copy_(torch.cat([index[:, None], self.history[:, :-1]], dim=1))
        return index, self._log_prob(logits, self.temperature, index)

    def fast(self, logits_NC: Tensor, noise: Tensor) -> tuple[Tensor, Tensor | None]:
        """A code (N,) and its log-probability (N,) from fast logits (N, C) (None without ``logprobs``)."""
        logits = logits_NC if logits_NC.dtype == torch.float32 else logits_NC.float()
        cut = self._cut(logits, self.fast_top_p, self.fast_top_k)
        code = self._draw(cut, self.fast_temperature, self.fast_divisor, noise)
        return code, self._log_prob(logits, self.fast_temperature, code)


@dataclass
class Frame:
    columns: Tensor  # (N, 1 + K): slow token id, then c0 .. c_{K-1} (zeros after <|im_end|>)
    slow_logprob: Tensor  # (N,)
    fast_logprob: Tensor  # (N, K - 1): of c1 .. c_{K-1}


def decode_frame(
    slow_logits_NA: Tensor,
    fast_logits: Callable[[int, Tensor], Tensor],
    sampler: RowSampler,
    noise: FrameNoise,
    vocab: SlowVocab,
    allow_end: Tensor | None = None,
) -> Frame:
    """One frame of N rows by S2's rule (module docstring).

    ``slow_logits_NA``: the slow logits of the allowed tokens; ``fast_logits(k, codes_NK)``: the fast
    logits (N, C) of codebook k given the codes drawn so far (columns 0 .. k-1 of codes_NK are set);
    ``allow_end`` (N,) bool: where False, <|im_end|> may not be drawn (a minimum length).
    """
    n = slow_logits_NA.shape[0]
    slow_noise, redraw_noise, code_noise = noise.parts(n)
    if allow_end is not None:
        slow_logits_NA = slow_logits_NA.clone()
        slow_logits_NA[:, vocab.end_index].masked_fill_(~allow_end, float("-inf"))
    index, slow_lp = sampler.slow(slow_logits_NA, slow_noise, redraw_noise, vocab)
    token = vocab.allowed_ids.index_select(0, index)  # (N,)
    codes = torch.zeros(n, vocab.num_codebooks, dtype=torch.long, device=token.device)
    codes[:, 0] = vocab.first_codes.index_select(0, index)  # clamp(token - semantic_begin_id, 0, C - 1)
    fast_lp = []
    for k in range(1, vocab.num_codebooks):
        code, lp = sampler.fast(fast_logits(k, codes), code_noise[:, k - 1])
        codes[:, k] = code
        fast_lp.append(lp)
    codes = codes.masked_fill((token == vocab.im_end_id)[:, None], 0)
    columns = torch.cat([token[:, None], codes], dim=1)
    if slow_lp is None:  # no row wants log-probabilities
        zeros = torch.zeros(n, vocab.num_codebooks, device=token.device)
        return Frame(columns, zeros[:, 0], zeros[:, 1:])
    return Frame(columns, slow_lp, torch.stack(fast_lp, dim=1))
