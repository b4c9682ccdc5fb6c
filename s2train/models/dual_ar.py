"""The Dual-AR language model of Fish Audio S2 Pro, in plain PyTorch.

Shape legend: B batch, T frames (positions), R = 1 + K rows of a frame-token tensor, K codebooks,
D slow model dim, Df fast model dim, V slow vocabulary, C fast vocabulary (the semantic codebook size),
N rows handed to the fast model (one per semantic frame), H heads, Hkv key/value heads, Dh head dim,
S key/value slots of a cache.

How a sequence flows::

    tokens (B, 1 + K, T)    row 0: text id or semantic_begin + c0; rows 1..K: codes c0..c_{K-1} (0 at text)
      -> SlowTransformer.embed: token embedding, + sum of the K codebook embeddings at semantic
         positions, the whole divided by sqrt(K + 1) there when scale_codebook_embeddings  (B, T, D)
      -> slow layers, final RMSNorm -> hidden (B, T, D); logits = hidden @ embeddings^T (tied) (B, T, V)
    hidden of a frame (N, D) and its codes (N, K)
      -> fast input [project_in(hidden), E(c0), .., E(c_{K-2})]                              (N, K, Df)
      -> fast layers (RoPE positions 0..K-1), final RMSNorm, head -> logits (N, K, C); output k predicts c_k

Output 0 predicts c0 from the hidden state alone; it is trained but unused at inference, where c0 is the
slow token minus ``semantic_begin_id``. Residual codebooks (k >= 1) may be smaller than the semantic one
(S2 Pro: 4096 and 1024): their logits beyond ``residual_codebook_size`` are -inf, so no impossible code
is ever predicted.

One embedding path. Upstream fish-speech embeds differently in training (``forward``: no scaling) and in
inference (``forward_generate``: semantic positions divided by sqrt(K + 1)); the released S2 Pro produces
audio only with the latter. s2train has one path for both, the inference one, so a model trained here
decodes the way it was trained; ``scale_codebook_embeddings=False`` gives upstream's training numbers
(the parity tests use it for that and nothing else).

Numerics follow the release (``tests/test_fish_dual_ar.py`` checks them against upstream's tensors):
RMSNorm in float32 then cast back and times the weight; the RoPE table rounded through bfloat16
(``rope_table_dtype``) and applied to interleaved pairs (2i, 2i+1); q/k RMSNorm per head before RoPE;
GQA where query head h reads key/value head h // (H / Hkv); the fast model's hidden input is the slow
output after the final norm. RMSNorm, the SwiGLU and RoPE are ``layers.py``'s, shared with the codec.

Incremental decoding uses an explicit cache passed to ``DualAR.forward`` (slow) and ``DualAR.fast_step``
(fast): no hooks, no module state, sized for the batch at hand. Two kinds share one small protocol
(``prepare`` the mask and default positions of T new positions, ``update`` each layer's keys and values,
``advance``): ``KVCache``, where every row fills the same slots (packed or left-padded batches, and the
fast model's K positions), and ``RowKVCache``, where every row is its own sequence with its own length
(continuous batching in ``s2train.inference.engine``; fixed shapes for CUDA graphs with ``static``).
``s2train.inference.step_decoder`` runs the same numbers one position at a time in fewer operations.
``s2train.compat.fish_dual_ar`` maps the released checkpoint's key names onto these modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s2train.checks import check
from s2train.models.layers import FeedForward, RMSNorm, apply_rope, rope_cos_sin

ROPE_TABLE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


# ---------------------------------------------------------------------------------------------- config


@dataclass
class DualARConfig:
    """Every size of the Dual-AR model. ``tiny()``, ``small()`` and ``s2pro()`` below are the presets."""

    vocab_size: int  # V: text tokens, specials and the semantic block, padded
    dim: int  # D
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_codebooks: int  # K: one semantic codebook plus K - 1 residual ones
    codebook_size: int  # C: the semantic codebook size, which is also the fast model's vocabulary
    residual_codebook_size: int  # <= C; residual logits beyond it are -inf
    semantic_begin_id: int  # token id of <|semantic:0|>
    semantic_end_id: int  # token id of <|semantic:C-1|>
    fast_n_layers: int
    fast_dim: int  # Df; a linear project_in maps the slow hidden state to it when it differs from D
    fast_n_heads: int
    fast_n_kv_heads: int
    fast_head_dim: int
    fast_intermediate_size: int
    rope_base: float = 1e6  # both models (upstream's fast model reads the slow model's base)
    rope_table_dtype: str = "bfloat16"  # the release rounds cos/sin through bfloat16
    norm_eps: float = 1e-6  # both models
    qk_norm: bool = True  # slow attention: RMSNorm of q and k per head, before RoPE
    fast_qk_norm: bool = False
    tie_embeddings: bool = True  # slow logits use the token embedding matrix
    max_seq_len: int = 4096  # slow positions per sequence (prompt and generation together)
    scale_codebook_embeddings: bool = True  # divide semantic-position embeddings by sqrt(K + 1)
    fast_shared_embeddings: bool = (
        True  # one fast input table indexed by raw code (S2), else one per codebook
    )
    fast_shared_head: bool = True  # one fast output head for all codebooks (S2), else one per codebook
    init_std: float = 0.02  # normal init of linear and embedding weights for training from scratch

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "intermediate_size",
            "fast_n_layers",
            "fast_dim",
            "fast_n_heads",
            "fast_n_kv_heads",
            "fast_head_dim",
            "fast_intermediate_size",
            "max_seq_len",
        ):
            check(getattr(self, name) >= 1, f"dual-AR {name} must be at least 1, not {getattr(self, name)}")
        for prefix in ("", "fast_"):
            heads, kv_heads = getattr(self, f"{prefix}n_heads"), getattr(self, f"{prefix}n_kv_heads")
            check(
                heads % kv_heads == 0,
                f"dual-AR {prefix}n_heads ({heads}) must be a multiple of {prefix}n_kv_heads ({kv_heads})",
            )
            head_dim = getattr(self, f"{prefix}head_dim")
            check(head_dim % 2 == 0, f"dual-AR {prefix}head_dim must be even for RoPE, not {head_dim}")
        check(
            self.rope_table_dtype in ROPE_TABLE_DTYPES,
            f"dual-AR rope_table_dtype must be one of {sorted(ROPE_TABLE_DTYPES)}, not {self.rope_table_dtype!r}",
        )
        check(self.rope_base > 1, f"dual-AR rope_base must be greater than 1, not {self.rope_base}")
        check(self.norm_eps > 0, f"dual-AR norm_eps must be positive, not {self.norm_eps}")
        check(
            self.num_codebooks >= 2,
            f"dual-AR num_codebooks must be at least 2 (a semantic and a residual one), not {self.num_codebooks}",
        )
        check(self.codebook_size >= 2, f"dual-AR codebook_size must be at least 2, not {self.codebook_size}")
        check(
            1 <= self.residual_codebook_size <= self.codebook_size,
            f"dual-AR residual_codebook_size ({self.residual_codebook_size}) must be between 1 and "
            f"codebook_size ({self.codebook_size})",
        )
        check(
            0 <= self.semantic_begin_id <= self.semantic_end_id < self.vocab_size,
            f"dual-AR semantic ids [{self.semantic_begin_id}, {self.semantic_end_id}] must be an ordered range "
            f"inside the vocabulary of {self.vocab_size}",
        )
        check(
            self.semantic_end_id - self.semantic_begin_id + 1 == self.codebook_size,
            f"dual-AR semantic ids [{self.semantic_begin_id}, {self.semantic_end_id}] must hold one token per "
            f"semantic code ({self.codebook_size})",
        )
        check(self.init_std > 0, f"dual-AR init_std must be positive, not {self.init_std}")

    def is_semantic(self, token_ids: Tensor) -> Tensor:
        """Bool, shaped like token_ids: semantic_begin_id <= id <= semantic_end_id."""
        return (token_ids >= self.semantic_begin_id) & (token_ids <= self.semantic_end_id)


def tiny() -> DualARConfig:
    """A 2 + 2 layer model over the tiny tokenizer layout (256 bytes, 16 specials, 64 semantic tokens) and
    the tiny codec (1 x 64 semantic + 3 x 32 residual codes); builds in milliseconds."""
    return DualARConfig(
        vocab_size=344,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        num_codebooks=4,
        codebook_size=64,
        residual_codebook_size=32,
        semantic_begin_id=272,
        semantic_end_id=335,
        fast_n_layers=2,
        fast_dim=64,
        fast_n_heads=4,
        fast_n_kv_heads=2,
        fast_head_dim=16,
        fast_intermediate_size=128,
        max_seq_len=1024,
    )


def demo() -> DualARConfig:
    """The CPU demo's speaking model: 4 slow layers of 192 and 2 fast layers of 128 (about 2.2M + 0.5M
    parameters besides the embeddings) over the byte tokenizer and the demo codec (8 x 256 codes); stage=
    pretrain fits the vocabulary and codebook shape to the data."""
    return DualARConfig(
        vocab_size=576,
        dim=192,
        n_layers=4,
        n_heads=6,
        n_kv_heads=2,
        head_dim=32,
        intermediate_size=512,
        num_codebooks=8,
        codebook_size=256,
        residual_codebook_size=256,
        semantic_begin_id=272,
        semantic_end_id=527,
        fast_n_layers=2,
        fast_dim=128,
        fast_n_heads=4,
        fast_n_kv_heads=2,
        fast_head_dim=32,
        fast_intermediate_size=384,
        max_seq_len=1024,
        fast_shared_embeddings=False,  # per-codebook tables and heads: learnt faster by a small fast model
        fast_shared_head=False,
    )


def small() -> DualARConfig:
    """About 227M slow + 31M fast parameters over the S2 Pro tokenizer and codec: trains on one GPU."""
    return DualARConfig(
        vocab_size=155776,
        dim=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=4,
        head_dim=64,
        intermediate_size=2048,
        num_codebooks=10,
        codebook_size=4096,
        residual_codebook_size=1024,
        semantic_begin_id=151678,
        semantic_end_id=155773,
        fast_n_layers=4,
        fast_dim=768,
        fast_n_heads=12,
        fast_n_kv_heads=4,
        fast_head_dim=64,
        fast_intermediate_size=2048,
        max_seq_len=8192,
    )


def s2pro() -> DualARConfig:
    """The released S2 Pro: about 4.1B slow + 0.4B fast parameters (Qwen3 vocabulary + 4096 semantic tokens)."""
    return DualARConfig(
        vocab_size=155776,
        dim=2560,
        n_layers=36,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        intermediate_size=9728,
        num_codebooks=10,
        codebook_size=4096,
        residual_codebook_size=1024,
        semantic_begin_id=151678,
        semantic_end_id=155773,
        fast_n_layers=4,
        fast_dim=2560,
        fast_n_heads=32,
        fast_n_kv_heads=8,
        fast_head_dim=128,
        fast_intermediate_size=9728,
        max_seq_len=32768,
        init_std=0.0198,
    )


# ---------------------------------------------------------------------------------------- KV cache


class KVCache:
    """Keys and values of every layer of one transformer (slow or fast) for a batch of B sequences.

    Slots fill left to right: a forward call with T new positions writes slots ``length .. length + T``
    and then advances ``length``. ``segment_ids`` (B, S) remembers each slot's segment, so that left
    padding (its own segment) is never attended to. Allocate with ``DualAR.new_cache`` or
    ``DualAR.new_fast_cache``; ``reset()`` reuses the buffers for a new sequence.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, Hkv, S, Dh)
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, Hkv, S, Dh)
        self.segment_ids = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)  # (B, S)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def reset(self) -> None:
        self.length = 0

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows start..stop-1 as a cache of their own that shares these buffers (its length is its own)."""
        view = object.__new__(KVCache)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.segment_ids, view.length = self.segment_ids[start:stop], self.length
        return view

    def prepare(self, T: int, segment_ids: Tensor | None) -> tuple[Tensor, Tensor]:
        """Before T new positions of every row: record their segments (B, T) (default all 0) and return
        the attention mask (B, 1, T, length + T) (True = may attend) and their default positions (1, T)."""
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise ValueError(f"{end} positions exceed the {self.max_len} that the cache holds")
        device = self.segment_ids.device
        if segment_ids is None:
            segment_ids = torch.zeros(self.segment_ids.shape[0], T, dtype=torch.long, device=device)
        self.segment_ids[:, start:end] = segment_ids
        slots = torch.arange(start, end, device=device)
        return segment_mask(slots, self.segment_ids[:, :end], segment_ids), slots[None]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store layer's new keys and values (B, Hkv, T, Dh) after the filled slots; return all of them
        (B, Hkv, length + T, Dh). ``length`` advances once every layer has stored (``advance``)."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, T: int) -> None:
        self.length += T


class RowKVCache:
    """Keys and values of every layer for B independent sequences, each with its own length (B,).

    Row b's T new positions go to slots ``lengths[b] .. lengths[b] + T`` and take those slot numbers as
    their RoPE positions; a position attends to the slots of its own row up to itself. Rows therefore
    join, grow and leave independently: the cache of continuous batching. ``rows(start, stop)`` is a view
    of some rows that shares the buffers (a prefill of one row, a step of the running rows).

    ``static=False`` (eager) attends over the first ``max(lengths) + T`` slots. ``static=True`` attends
    over all ``max_len`` slots and never reads a tensor on the host, so one step has fixed shapes and can
    be captured in a CUDA graph; slots past a row's end are masked, and writes past ``max_len`` (rows
    that are not in use) are clamped into the last slot, which such a row never reads.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        static: bool = False,
    ):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, Hkv, S, Dh)
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, Hkv, S, Dh)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.static = static
        self._slots: Tensor | None = None  # (B, T) where the positions being run are written
        self._width = 0  # key slots attended in the current forward

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def rows(self, start: int, stop: int) -> RowKVCache:
        """Rows start..stop-1 as a cache of their own, sharing these buffers and lengths."""
        view = object.__new__(RowKVCache)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.lengths, view.static = self.lengths[start:stop], self.static
        view._slots, view._width = None, 0
        return view

    def prepare(self, T: int, segment_ids: Tensor | None) -> tuple[Tensor, Tensor]:
        """The mask (B, 1, T, W) and positions (B, T) of T new positions of every row."""
        if segment_ids is not None:
            raise ValueError("a RowKVCache row holds one sequence: segment ids do not apply")
        device = self.lengths.device
        slots = self.lengths[:, None] + torch.arange(T, device=device)  # (B, T)
        if self.static:
            self._width = self.max_len
        else:
            self._width = int(self.lengths.max()) + T
            if self._width > self.max_len:
                raise ValueError(f"{self._width} positions exceed the {self.max_len} that the cache holds")
        self._slots = slots.clamp_max(self.max_len - 1)
        keys = torch.arange(self._width, device=device)
        return (keys[None, None, :] <= slots[:, :, None])[:, None], slots

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store layer's new keys and values (B, Hkv, T, Dh) at each row's slots; return the attended
        slots (B, Hkv, W, Dh)."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
        self.k[layer][rows, :, self._slots] = k.transpose(1, 2)  # indexed as (B, T, Hkv, Dh)
        self.v[layer][rows, :, self._slots] = v.transpose(1, 2)
        return self.k[layer, :, :, : self._width], self.v[layer, :, :, : self._width]

    def advance(self, T: int) -> None:
        self.lengths += T


def segment_mask(query_slots: Tensor, key_segments: Tensor, query_segments: Tensor) -> Tensor:
    """Causal attention inside segments: query slots (T,), segments of the keys (B, S) and of the queries
    (B, T) -> (B, 1, T, S), True where key slot s <= the query's slot and their segments agree."""
    causal = torch.arange(key_segments.shape[1], device=query_slots.device)[None, :] <= query_slots[:, None]
    same_segment = key_segments[:, None, :] == query_segments[:, :, None]  # (B, T, S)
    return (causal[None] & same_segment)[:, None]


# ------------------------------------------------------------------------------------ attention, block


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and optional per-head q/k RMSNorm. (B, T, D) -> (B, T, D)."""

    def __init__(
        self,
        layer_index: int,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        qk_norm: bool,
        norm_eps: float,
    ):
        super().__init__()
        self.layer_index = layer_index  # this layer's slot in a KVCache
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        # Rows: q (H * Dh), then k (Hkv * Dh), then v (Hkv * Dh), each head-major.
        self.wqkv = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor | None,
        cache: KVCache | RowKVCache | None = None,
    ) -> Tensor:
        """x (B, T, D); rope cos/sin (B or 1, T, Dh/2); mask (B or 1, 1, T, S) True = may attend, or None
        for plain causal attention over x alone; with ``cache``, x continues the cached positions."""
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.unflatten(-1, (self.n_heads, self.head_dim))  # (B, T, H, Dh)
        k = k.unflatten(-1, (self.n_kv_heads, self.head_dim))  # (B, T, Hkv, Dh)
        v = v.unflatten(-1, (self.n_kv_heads, self.head_dim))  # (B, T, Hkv, Dh)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, Dh)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)  # (B, Hkv, S, Dh)
        groups = self.n_heads // self.n_kv_heads  # query head h reads key/value head h // groups
        if cache is None:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, S, Dh)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        else:
            # Decoding reads the cached keys and values as they are, without a copy per group: the query
            # heads of one key/value head become extra query rows, (B, Hkv, G * T, Dh), row g * T + t.
            T = q.shape[2]
            q = q.unflatten(1, (self.n_kv_heads, groups)).flatten(2, 3)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(1, 1, groups, 1))
            out = out.unflatten(2, (groups, T)).flatten(1, 2)  # (B, H, T, Dh)
        return self.wo(out.transpose(1, 2).flatten(2))  # (B, T, D)


class TransformerBlock(nn.Module):
    """Pre-norm attention and SwiGLU, each with a residual. (B, T, D) -> (B, T, D)."""

    def __init__(
        self,
        layer_index: int,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        intermediate_size: int,
        qk_norm: bool,
        norm_eps: float,
    ):
        super().__init__()
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.attention = Attention(layer_index, dim, n_heads, n_kv_heads, head_dim, qk_norm, norm_eps)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.feed_forward = FeedForward(dim, intermediate_size)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor | None,
        cache: KVCache | RowKVCache | None = None,
    ) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """A causal stack of blocks and a final RMSNorm: embeddings (B, T, D) -> normed hidden (B, T, D).

    The slow and the fast model are this stack with their own embeddings and heads around it.
    """

    def __init__(
        self,
        n_layers: int,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        intermediate_size: int,
        qk_norm: bool,
        norm_eps: float,
        rope_base: float,
        rope_table_dtype: str,
        max_len: int,
    ):
        super().__init__()
        self.n_kv_heads, self.head_dim, self.max_len = n_kv_heads, head_dim, max_len
        self.rope_base, self.rope_table_dtype = rope_base, ROPE_TABLE_DTYPES[rope_table_dtype]
        self.layers = nn.ModuleList(
            TransformerBlock(i, dim, n_heads, n_kv_heads, head_dim, intermediate_size, qk_norm, norm_eps)
            for i in range(n_layers)
        )
        self.norm = RMSNorm(dim, norm_eps)

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        if not 1 <= max_len <= self.max_len:
            raise ValueError(f"a KV cache holds between 1 and {self.max_len} positions, not {max_len}")
        return KVCache(
            len(self.layers), batch_size, max_len, self.n_kv_heads, self.head_dim, dtype=dtype, device=device
        )

    def forward(
        self,
        x: Tensor,
        positions: Tensor | None = None,
        segment_ids: Tensor | None = None,
        cache: KVCache | RowKVCache | None = None,
    ) -> Tensor:
        """x (B, T, D) -> (B, T, D), after the final norm.

        positions (B or 1, T): RoPE positions; default the slot indices (with a cache: its next slots).
        segment_ids (B, T): a position attends only to earlier positions of its own segment (packing,
        padding). With ``cache``, x continues the cached slots, which it writes and then counts.
        """
        T = x.shape[1]
        if cache is None:
            if T > self.max_len:
                raise ValueError(f"{T} positions exceed the {self.max_len} that the model holds")
            slots = torch.arange(T, device=x.device)
            mask = None if segment_ids is None else segment_mask(slots, segment_ids, segment_ids)
            default_positions = slots[None]  # (1, T)
        else:
            mask, default_positions = cache.prepare(T, segment_ids)
        if positions is None:
            positions = default_positions
        rope = rope_cos_sin(positions, self.head_dim, self.rope_base, self.rope_table_dtype)
        for layer in self.layers:
            x = layer(x, rope, mask, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)


# ------------------------------------------------------------------------------------- slow and fast


class SlowTransformer(Transformer):
    """The slow model: frame-token embeddings, the stack, and the tied (or separate) LM head."""

    def __init__(self, cfg: DualARConfig):
        super().__init__(
            cfg.n_layers,
            cfg.dim,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.head_dim,
            cfg.intermediate_size,
            cfg.qk_norm,
            cfg.norm_eps,
            cfg.rope_base,
            cfg.rope_table_dtype,
            cfg.max_seq_len,
        )
        self.cfg = cfg
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # The slow model's input table for codes: row i * C + c is code c of codebook i.
        self.codebook_embeddings = nn.Embedding(cfg.num_codebooks * cfg.codebook_size, cfg.dim)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def embed(self, tokens: Tensor) -> Tensor:
        """tokens (B, 1 + K, T) -> (B, T, D). At a semantic position (semantic_begin <= row 0 <=
        semantic_end): token embedding + sum of the K code embeddings, / sqrt(K + 1) when scaling."""
        cfg = self.cfg
        token_ids = tokens[:, 0]  # (B, T)
        semantic = cfg.is_semantic(token_ids)  # (B, T)
        offsets = torch.arange(cfg.num_codebooks, device=tokens.device)[:, None] * cfg.codebook_size  # (K, 1)
        codes = torch.where(semantic[:, None], tokens[:, 1:], 0) + offsets  # (B, K, T)
        code_sum = self.codebook_embeddings(codes).sum(dim=1)  # (B, T, D)
        x = self.embeddings(token_ids) + torch.where(semantic[..., None], code_sum, 0.0)
        if cfg.scale_codebook_embeddings:
            x = torch.where(semantic[..., None], x / math.sqrt(cfg.num_codebooks + 1), x)
        return x

    def logits(self, hidden: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, V) over the whole (padded) vocabulary."""
        if self.output is None:
            return F.linear(hidden, self.embeddings.weight)
        return self.output(hidden)


class FastHead(nn.Module):
    """Fast output head: one (C, Df) matrix for all codebooks, or one per codebook (weight (K, C, Df))."""

    def __init__(self, dim: int, codebook_size: int, num_codebooks: int, shared: bool):
        super().__init__()
        shape = (codebook_size, dim) if shared else (num_codebooks, codebook_size, dim)
        self.weight = nn.Parameter(torch.empty(shape))

    def forward(self, x: Tensor, first_codebook: int) -> Tensor:
        """x (N, T, Df), where position t predicts codebook first_codebook + t -> (N, T, C)."""
        if self.weight.dim() == 2:
            return F.linear(x, self.weight)
        weight = self.weight[first_codebook : first_codebook + x.shape[1]]  # (T, C, Df)
        return torch.einsum("ntd,tcd->ntc", x, weight)


class FastTransformer(Transformer):
    """The fast model: turns a slow hidden state and a frame's codes into the logits of each code."""

    def __init__(self, cfg: DualARConfig):
        super().__init__(
            cfg.fast_n_layers,
            cfg.fast_dim,
            cfg.fast_n_heads,
            cfg.fast_n_kv_heads,
            cfg.fast_head_dim,
            cfg.fast_intermediate_size,
            cfg.fast_qk_norm,
            cfg.norm_eps,
            cfg.rope_base,
            cfg.rope_table_dtype,
            cfg.num_codebooks,
        )
        self.cfg = cfg
        self.project_in = nn.Linear(cfg.dim, cfg.fast_dim) if cfg.fast_dim != cfg.dim else None
        # Input codes are c0 .. c_{K-2}: shared, one table indexed by the raw code (codebook identity comes
        # from the RoPE position only); else row i * C + c is code c of codebook i.
        rows = cfg.codebook_size * (1 if cfg.fast_shared_embeddings else cfg.num_codebooks - 1)
        self.embeddings = nn.Embedding(rows, cfg.fast_dim)
        self.output = FastHead(cfg.fast_dim, cfg.codebook_size, cfg.num_codebooks, cfg.fast_shared_head)

    def embed(self, codes: Tensor, first_codebook: int = 0) -> Tensor:
        """codes (N, J) of codebooks first_codebook .. first_codebook + J - 1 -> fast inputs (N, J, Df)."""
        if not self.cfg.fast_shared_embeddings:
            codebooks = torch.arange(first_codebook, first_codebook + codes.shape[1], device=codes.device)
            codes = codes + codebooks * self.cfg.codebook_size
        return self.embeddings(codes)

    def inputs(self, hidden: Tensor, codes: Tensor) -> Tensor:
        """hidden (N, D) and codes (N, J) -> [project_in(hidden), E(c0), .., E(c_{J-1})] (N, 1 + J, Df)."""
        first = hidden if self.project_in is None else self.project_in(hidden)
        return torch.cat([first[:, None], self.embed(codes)], dim=1)

    def logits(self, hidden: Tensor, first_codebook: int) -> Tensor:
        """hidden (N, T, Df) at fast positions first_codebook .. -> (N, T, C), residual codes beyond
        ``residual_codebook_size`` set to -inf."""
        logits = self.output(hidden, first_codebook)  # (N, T, C)
        cfg = self.cfg
        if cfg.residual_codebook_size < cfg.codebook_size:
            codebooks = torch.arange(first_codebook, first_codebook + hidden.shape[1], device=hidden.device)
            impossible = (codebooks[:, None] >= 1) & (
                torch.arange(cfg.codebook_size, device=hidden.device) >= cfg.residual_codebook_size
            )  # (T, C)
            logits = logits.masked_fill(impossible, float("-inf"))
        return logits


# ---------------------------------------------------------------------------------------------- model


class SlowOutput(NamedTuple):
    logits: Tensor  # (B, T, V)
    hidden: Tensor  # (B, T, D), after the final norm: the fast model's input


class DualAR(nn.Module):
    """Slow transformer over frames, fast transformer over the codebooks of one frame."""

    def __init__(self, config: DualARConfig):
        super().__init__()
        self.config = config
        self.slow = SlowTransformer(config)
        self.fast = FastTransformer(config)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding, FastHead)):
            nn.init.normal_(module.weight, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty slow cache for ``batch_size`` sequences of up to ``max_len`` positions."""
        weight = self.slow.embeddings.weight
        return self.slow.new_cache(batch_size, max_len, dtype or weight.dtype, weight.device)

    def new_row_cache(
        self, batch_size: int, max_len: int, dtype: torch.dtype | None = None, *, static: bool = False
    ) -> RowKVCache:
        """An empty slow cache for ``batch_size`` independent sequences of up to ``max_len`` positions."""
        if not 1 <= max_len <= self.config.max_seq_len:
            raise ValueError(
                f"a KV cache holds between 1 and {self.config.max_seq_len} positions, not {max_len}"
            )
        cfg, weight = self.config, self.slow.embeddings.weight
        return RowKVCache(
            cfg.n_layers,
            batch_size,
            max_len,
            cfg.n_kv_heads,
            cfg.head_dim,
            dtype=dtype or weight.dtype,
            device=weight.device,
            static=static,
        )

    def new_fast_cache(self, batch_size: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty fast cache for ``batch_size`` frames (K positions each); ``reset()`` it per frame."""
        weight = self.fast.embeddings.weight
        return self.fast.new_cache(
            batch_size, self.config.num_codebooks, dtype or weight.dtype, weight.device
        )

    def forward(
        self,
        tokens_BRT: Tensor,
        positions_BT: Tensor | None = None,
        segment_ids_BT: Tensor | None = None,
        cache: KVCache | RowKVCache | None = None,
    ) -> SlowOutput:
        """The slow model over frame tokens (B, 1 + K, T) -> logits (B, T, V), hidden (B, T, D).

        positions_BT: RoPE positions, default 0 .. T - 1 (with ``cache``: continuing its slots).
        segment_ids_BT: packed sequences; a position attends only to earlier ones of its segment.
        cache: incremental decoding; the T frames continue the cached ones and are appended to it.
        """
        if tokens_BRT.dim() != 3 or tokens_BRT.shape[1] != 1 + self.config.num_codebooks:
            raise ValueError(
                f"tokens must be (B, 1 + K, T) with K = {self.config.num_codebooks}, "
                f"not {tuple(tokens_BRT.shape)}"
            )
        hidden = self.slow(self.slow.embed(tokens_BRT), positions_BT, segment_ids_BT, cache)
        return SlowOutput(self.slow.logits(hidden), hidden)

    def fast_forward(self, hidden_ND: Tensor, codes_NK: Tensor) -> Tensor:
        """Teacher-forced fast model: hidden (N, D) and the frame's codes (N, K) -> logits (N, K, C).

        Input [hidden, E(c0), .., E(c_{K-2})]; output k predicts c_k (output 0: c0 from the hidden state
        alone). Ignored targets (-100) are fed as code 0, so labels can be passed as they are.
        """
        codes = codes_NK[:, :-1].clamp_min(0)  # (N, K - 1)
        return self.fast.logits(self.fast(self.fast.inputs(hidden_ND, codes)), 0)

    def fast_inputs(self, hidden_ND: Tensor, codes_NJ: Tensor | None = None) -> Tensor:
        """Fast inputs [project_in(hidden), E(c0), .., E(c_{J-1})] (N, 1 + J, Df) for ``fast_step``."""
        if codes_NJ is None:
            codes_NJ = hidden_ND.new_zeros(hidden_ND.shape[0], 0, dtype=torch.long)
        return self.fast.inputs(hidden_ND, codes_NJ)

    def fast_embed(self, codes_NJ: Tensor, first_codebook: int) -> Tensor:
        """Fast inputs (N, J, Df) of codes (N, J) of codebooks first_codebook .. (for ``fast_step``)."""
        return self.fast.embed(codes_NJ, first_codebook)

    def fast_step(self, x_NTD: Tensor, cache: KVCache) -> Tensor:
        """Fast inputs (N, T, Df) at fast positions ``cache.length`` .. -> logits (N, T, C) of those codebooks.

        A frame: ``cache.reset()``; ``fast_step(fast_inputs(h), cache)`` (output 0, unused at inference);
        then for k = 1 .. K - 1 ``fast_step(fast_embed(c_{k-1}[:, None], k - 1), cache)`` gives c_k.
        """
        first = cache.length
        return self.fast.logits(self.fast(x_NTD, cache=cache), first)
