"""The eager one-step decoder of the inference engine: the Dual-AR model's slow and fast transformers for
one new position per row, in about half the tensor operations of the modules and with their numbers.

Shape legend: N rows, R = 1 + K rows of a frame column, K codebooks, D slow model dim, Df fast model dim,
C fast vocabulary (the semantic codebook size), H heads, Hkv key/value heads, G = H / Hkv, Dh head dim,
I SwiGLU hidden size, S key/value slots of a row, W slots attended.

``s2train.inference.engine`` is its only user (its CPU path); ``tests/test_dual_ar.py`` and
``tests/test_engine.py`` check it against ``DualAR.forward`` and ``DualAR.fast_step`` bit for bit.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from s2train.models.dual_ar import ROPE_TABLE_DTYPES, DualAR, KVCache, RowKVCache, Transformer
from s2train.models.layers import rope_cos_sin


class _Layer(NamedTuple):
    """The weights of one block as plain tensors (detached views of its parameters), the projections
    transposed (``x @ w`` is ``F.linear(x, w.T)``: the same matrix product, one call instead of four)."""

    attention_norm: Tensor  # (D,)
    wqkv: Tensor  # (D, (H + 2 Hkv) Dh)
    qk_norm: Tensor | None  # (H + Hkv, Dh): q_norm's weight for every query head, then k_norm's per kv head
    wo: Tensor  # (H Dh, D)
    ffn_norm: Tensor  # (D,)
    w1: Tensor  # (D, I)
    w3: Tensor  # (D, I)
    w2: Tensor  # (I, D)


def _layers(stack: Transformer) -> list[_Layer]:
    layers = []
    for block in stack.layers:
        attention, ffn = block.attention, block.feed_forward
        qk_norm = None
        if attention.q_norm is not None and attention.k_norm is not None:
            qk_norm = torch.cat(
                [
                    attention.q_norm.weight.detach().expand(attention.n_heads, -1),
                    attention.k_norm.weight.detach().expand(attention.n_kv_heads, -1),
                ]
            )
        layers.append(
            _Layer(
                block.attention_norm.weight.detach(),
                attention.wqkv.weight.detach().t(),
                qk_norm,
                attention.wo.weight.detach().t(),
                block.ffn_norm.weight.detach(),
                ffn.w1.weight.detach().t(),
                ffn.w3.weight.detach().t(),
                ffn.w2.weight.detach().t(),
            )
        )
    return layers


def rope_rows(
    n: int, head_dim: int, base: float, table_dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """The rotation of positions 0 .. n - 1 for ``x * cos + swap_pairs(x) * sin``: cos (n, Dh), cos_i at
    2i and 2i + 1; sin (n, Dh), -sin_i at 2i and sin_i at 2i + 1 (the values of ``rope_cos_sin``); and
    swap (Dh, Dh), the permutation matrix with x @ swap = swap_pairs(x) (x_{2i+1} at 2i, x_{2i} at 2i + 1)."""
    cos, sin = rope_cos_sin(torch.arange(n, device=device), head_dim, base, table_dtype)  # (n, Dh/2)
    pairs = torch.arange(head_dim, device=device).view(-1, 2).flip(-1).flatten()  # output j reads pairs[j]
    swap = torch.zeros(head_dim, head_dim, device=device)
    swap[pairs, torch.arange(head_dim, device=device)] = 1.0
    return torch.stack([cos, cos], -1).flatten(-2), torch.stack([-sin, sin], -1).flatten(-2), swap


def _rms_norm(x: Tensor, weight: Tensor, eps: Tensor, size: Tensor) -> Tensor:
    """``RMSNorm.forward`` with tensors for the weight, eps and the normalized size (a Python number
    costs a tensor per call): the same numbers, as mean(x^2) + eps is eps + sum(x * x) / size in float32."""
    if x.dtype != torch.float32:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight
    return torch.mul(x, torch.rsqrt(torch.addcdiv(eps, (x * x).sum(-1, keepdim=True), size))).mul_(weight)


def _rope(x: Tensor, cos: Tensor, sin: Tensor, swap: Tensor) -> Tensor:
    """``layers.apply_rope`` with ``rope_rows`` tables: x (..., Dh) -> x * cos + swap_pairs(x) * sin, in
    float32, where swap_pairs(x) = x @ swap, a permutation matrix (each output is one input times 1, exactly).
    Bit for bit the same: x1 * -sin added is x1 * sin subtracted. Four operations instead of about ten:
    on a CPU half the time of ``apply_rope`` per call, and it runs for every layer of every step."""
    x32 = x if x.dtype == torch.float32 else x.float()  # .float() is a dispatched call even when a no-op
    swapped = torch.mm(x32.reshape(-1, x.shape[-1]), swap).view(x.shape)
    out = torch.mul(x32, cos).add_(swapped.mul_(sin))
    return out if x.dtype == torch.float32 else out.type_as(x)


class StepDecoder:
    """The slow and fast models for decoding one column at a time, in few tensor operations.

    Decoding a small model on a CPU is bound by the cost of each operation, not by its arithmetic
    (``tiny``: about a thousand small ATen calls a frame through the modules). This path computes the
    same numbers as ``DualAR.forward`` and ``DualAR.fast_step`` with a cache (``tests/test_dual_ar.py``
    compares them bit for bit) in about half the calls: the weights as plain tensors, no module calls;
    activations kept 2-D (rows, D); RoPE read from a table of every slot's rotation (the same
    bfloat16-rounded values) and applied to q and k together as ``x * cos + swap_pairs(x) * sin``; the q/k
    RMSNorm of all heads in one go; Python numbers made tensors once; each new key and value written with
    one scatter or copy into views made once; no attention mask when every row attends to all of its
    slots; the fast model's RoPE rows and mask made once; ``torch.split_with_sizes`` rather than
    ``Tensor.split`` (whose Python wrapper costs as much as the split) and no no-op ``.float()``. (Run it under ``torch.inference_mode``, as the
    engine does, for a fifth less per call.)

    It reads the weights when it is built (detached views of the parameters: in-place updates show, a
    replaced parameter does not): build one per generation run. ``max_len`` bounds the slow positions.
    ``slow_step`` continues an eager ``RowKVCache``; ``fast_first`` and ``fast_next`` fill a fast
    ``KVCache`` (one frame: fast positions 0-1, then one position per code).
    """

    def __init__(self, model: DualAR, max_len: int):
        cfg, device = model.config, model.slow.embeddings.weight.device
        self.config = cfg
        self.slow_layers, self.fast_layers = _layers(model.slow), _layers(model.fast)
        slow, fast = model.slow, model.fast
        self.embeddings = slow.embeddings.weight.detach()  # (V, D)
        self.codebook_embeddings = slow.codebook_embeddings.weight.detach()  # (K C, D)
        self.code_offsets = torch.arange(cfg.num_codebooks, device=device) * cfg.codebook_size  # (K,)
        self.slow_norm = slow.norm.weight.detach()
        table_dtype = ROPE_TABLE_DTYPES[cfg.rope_table_dtype]
        self.slow_cos, self.slow_sin, self.slow_swap = rope_rows(
            max_len, cfg.head_dim, cfg.rope_base, table_dtype, device
        )
        # Python numbers in an operation cost a tensor each call: these are made once.
        scalar = lambda value: torch.tensor(value, device=device)  # noqa: E731  float32, 0-d
        self.eps = scalar(cfg.norm_eps)
        self.sizes = {n: scalar(float(n)) for n in (cfg.dim, cfg.head_dim, cfg.fast_dim, cfg.fast_head_dim)}
        self.embedding_scale = scalar(math.sqrt(cfg.num_codebooks + 1))
        self.zero = scalar(0.0)
        self.keys = torch.arange(max_len, device=device)  # (S,)
        self.project_in = None  # (weight, bias) of the fast model's input projection, if it has one
        if fast.project_in is not None:
            self.project_in = (fast.project_in.weight.detach(), fast.project_in.bias.detach())
        self.fast_embeddings = fast.embeddings.weight.detach()  # (C or (K - 1) C, Df)
        self.fast_norm = fast.norm.weight.detach()
        self.fast_output = fast.output
        self.fast_head = fast.output.weight.detach().t() if cfg.fast_shared_head else None  # (Df, C)
        cos, sin, self.fast_swap = rope_rows(
            cfg.num_codebooks, cfg.fast_head_dim, cfg.rope_base, table_dtype, device
        )
        self.fast_cos, self.fast_sin = cos[:, None], sin[:, None]  # (K, 1, Dh): broadcast over the heads
        groups = cfg.fast_n_heads // cfg.fast_n_kv_heads
        # Fast positions 0 and 1 together: query row g * 2 + t of a kv head attends to slots 0 .. t.
        self.fast_first_mask = torch.ones(2, 2, dtype=torch.bool, device=device).tril().repeat(groups, 1)
        # A residual codebook's codes beyond residual_codebook_size are impossible (FastTransformer.logits):
        # -inf added there (the masked_fill's numbers; 0 added elsewhere changes no logit).
        self.impossible = torch.arange(cfg.codebook_size, device=device) >= cfg.residual_codebook_size  # (C,)
        self.mask_impossible = cfg.residual_codebook_size < cfg.codebook_size
        self.impossible_bias = torch.zeros(cfg.codebook_size, device=device, dtype=self.fast_norm.dtype)
        self.impossible_bias.masked_fill_(self.impossible, float("-inf"))
        self._fast_slots: tuple[tuple, list] = ((), [])  # see fast_slots

    def fast_slots(self, cache: KVCache) -> list[list[tuple[Tensor, Tensor, Tensor, Tensor]]]:
        """Views of a fast cache, [layer][position p]: the key and value slot p (N, Hkv, Dh) and slots
        0 .. p (N, Hkv, p + 1, Dh); made once per cache and row count, not per step."""
        key = (cache.k.data_ptr(), cache.k.shape, cache.k.stride())
        if self._fast_slots[0] != key:
            views = []
            for k, v in zip(cache.k, cache.v):  # (N, Hkv, K, Dh) each
                views.append(
                    [(k[:, :, p], v[:, :, p], k[:, :, : p + 1], v[:, :, : p + 1]) for p in range(k.shape[2])]
                )
            self._fast_slots = (key, views)
        return self._fast_slots[1]

    # ---------------------------------------------------------------------------------------- slow

    def slow_embed(self, columns_NR: Tensor) -> Tensor:
        """``SlowTransformer.embed`` of one column per row (N, 1 + K) -> (N, D)."""
        cfg = self.config
        token = columns_NR[:, 0]  # (N,)
        semantic = ((token >= cfg.semantic_begin_id) & (token <= cfg.semantic_end_id))[:, None]  # (N, 1)
        codes = torch.where(semantic, columns_NR[:, 1:], 0) + self.code_offsets  # (N, K)
        code_sum = torch.embedding(self.codebook_embeddings, codes).sum(dim=1)  # (N, D)
        x = torch.embedding(self.embeddings, token) + torch.where(semantic, code_sum, self.zero)
        if cfg.scale_codebook_embeddings:
            x = torch.where(semantic, x / self.embedding_scale, x)
        return x

    def slow_step(self, columns_NR: Tensor, cache: RowKVCache) -> Tensor:
        """One column per row (N, 1 + K) at each row's next slot -> hidden (N, D) after the final norm,
        as ``DualAR.forward(columns[:, :, None], cache=cache).hidden[:, 0]``; the rows advance by one."""
        if cache.static:
            raise ValueError("StepDecoder.slow_step runs an eager RowKVCache, not a static one")
        cfg, N = self.config, columns_NR.shape[0]
        H, Hkv, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        G = H // Hkv  # query heads per kv head
        lengths = cache.lengths  # (N,) each row's next slot
        low, high = (int(lengths), int(lengths)) if N == 1 else torch.stack(lengths.aminmax()).tolist()
        width = high + 1  # slots attended
        if width > cache.max_len:
            raise ValueError(f"{width} positions exceed the {cache.max_len} that the cache holds")
        mask = None  # every row attends to all `width` slots
        if low != high:  # (N, 1, G, W): row n attends to its slots up to its own
            mask = (self.keys[:width] <= lengths[:, None])[:, None, None, :].repeat(1, 1, G, 1)
        cos = self.slow_cos.index_select(0, lengths)[:, None]  # (N, 1, Dh)
        sin = self.slow_sin.index_select(0, lengths)[:, None]
        slots = lengths.view(N, 1, 1, 1).expand(N, Hkv, 1, Dh)
        keys, values = cache.k[:, :, :, :width], cache.v[:, :, :, :width]  # (L, N, Hkv, W, Dh)
        eps, D, Dh_size = self.eps, self.sizes[cfg.dim], self.sizes[Dh]
        x = self.slow_embed(columns_NR)  # (N, D)
        for i, layer in enumerate(self.slow_layers):
            q, k_new, v_new = self._qkv(x, layer, (H, Hkv, Dh), D, Dh_size, cos, sin, self.slow_swap)
            k, v = keys[i], values[i]  # (N, Hkv, W, Dh)
            k.scatter_(2, slots, k_new[:, :, None])
            v.scatter_(2, slots, v_new.view(N, Hkv, 1, Dh))
            # The G query heads of a kv head are its query rows: (N, Hkv, G, Dh), as in Attention.
            out = F.scaled_dot_product_attention(q.view(N, Hkv, G, Dh), k, v, attn_mask=mask)
            x.add_(torch.mm(out.reshape(N, H * Dh), layer.wo))
            x.add_(self._ffn(x, layer, D))
        cache.advance(1)
        return _rms_norm(x, self.slow_norm, eps, D)

    def _qkv(self, x, layer: _Layer, heads, size: Tensor, head_size: Tensor, cos, sin, swap):
        """Normed, projected, (q/k-normed) and rotated: q (N, H, Dh), new k (N, Hkv, Dh), new v
        (N, Hkv * Dh); ``heads`` is (H, Hkv, Dh)."""
        H, Hkv, Dh = heads
        qkv = torch.mm(_rms_norm(x, layer.attention_norm, self.eps, size), layer.wqkv)  # (N, (H + 2 Hkv) Dh)
        qk, v_new = torch.split_with_sizes(qkv, ((H + Hkv) * Dh, Hkv * Dh), 1)
        qk = qk.view(x.shape[0], H + Hkv, Dh)
        if layer.qk_norm is not None:
            qk = _rms_norm(qk, layer.qk_norm, self.eps, head_size)
        q, k_new = torch.split_with_sizes(_rope(qk, cos, sin, swap), (H, Hkv), 1)
        return q, k_new, v_new

    def _ffn(self, x: Tensor, layer: _Layer, size: Tensor) -> Tensor:
        h = _rms_norm(x, layer.ffn_norm, self.eps, size)
        return torch.mm(F.silu(torch.mm(h, layer.w1), inplace=True).mul_(torch.mm(h, layer.w3)), layer.w2)

    # ---------------------------------------------------------------------------------------- fast

    def fast_embed(self, codes_N: Tensor, codebook: int) -> Tensor:
        """``FastTransformer.embed`` of one code per row (N,) of ``codebook`` -> (N, Df)."""
        if not self.config.fast_shared_embeddings:
            codes_N = codes_N + codebook * self.config.codebook_size
        return torch.embedding(self.fast_embeddings, codes_N)

    def _fast_logits(self, x: Tensor) -> Tensor:
        """Final norm and shared head (M, Df) -> (M, C), codes impossible in a residual codebook -inf."""
        h = _rms_norm(x, self.fast_norm, self.eps, self.sizes[self.config.fast_dim])
        logits = torch.mm(h, self.fast_head)
        return logits + self.impossible_bias if self.mask_impossible else logits

    def fast_first(self, hidden_ND: Tensor, c0_N: Tensor, cache: KVCache) -> Tensor:
        """Fast positions 0 and 1, [hidden, E(c0)], into the emptied ``cache`` -> logits of c1 (N, C);
        ``DualAR.fast_step(fast_inputs(hidden, c0[:, None]), cache)[:, 1]``."""
        cfg, N = self.config, hidden_ND.shape[0]
        H, Hkv, Dh = cfg.fast_n_heads, cfg.fast_n_kv_heads, cfg.fast_head_dim
        G, split = H // Hkv, ((H + Hkv) * Dh, Hkv * Dh)  # q and k, v
        first = hidden_ND if self.project_in is None else F.linear(hidden_ND, *self.project_in)
        x = torch.stack([first, self.fast_embed(c0_N, 0)], dim=1).flatten(0, 1)  # (N 2, Df), row n * 2 + t
        cos, sin = self.fast_cos[:2], self.fast_sin[:2]  # (2, 1, Dh)
        eps, D, Dh_size = self.eps, self.sizes[cfg.fast_dim], self.sizes[Dh]
        slots = self.fast_slots(cache)
        for i, layer in enumerate(self.fast_layers):
            qkv = torch.mm(_rms_norm(x, layer.attention_norm, eps, D), layer.wqkv)  # (N 2, (H + 2 Hkv) Dh)
            qk, v_new = torch.split_with_sizes(qkv, split, 1)
            qk = qk.view(N, 2, H + Hkv, Dh)
            if layer.qk_norm is not None:
                qk = _rms_norm(qk, layer.qk_norm, eps, Dh_size)
            q, k_new = torch.split_with_sizes(_rope(qk, cos, sin, self.fast_swap), (H, Hkv), 2)
            k, v = slots[i][1][2:]  # (N, Hkv, 2, Dh)
            k.copy_(k_new.transpose(1, 2))
            v.copy_(v_new.view(N, 2, Hkv, Dh).transpose(1, 2))
            # Query rows g * 2 + t of each kv head, as in Attention: (N, Hkv, G 2, Dh).
            q = q.view(N, 2, Hkv, G, Dh).permute(0, 2, 3, 1, 4).reshape(N, Hkv, G * 2, Dh)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.fast_first_mask)
            out = out.view(N, Hkv, G, 2, Dh).permute(0, 3, 1, 2, 4).reshape(N * 2, H * Dh)
            x.add_(torch.mm(out, layer.wo))
            x.add_(self._ffn(x, layer, D))
        cache.length = 2
        if self.fast_head is None:  # one head per codebook: FastHead's own path
            return self._unshared_logits(x.view(N, 2, -1), 0)[:, 1]
        # The head over both positions, as DualAR.fast_step runs it (the same matrix product shapes).
        return self._fast_logits(x).view(N, 2, -1)[:, 1]

    def _unshared_logits(self, x: Tensor, first_codebook: int) -> Tensor:
        h = _rms_norm(x, self.fast_norm, self.eps, self.sizes[self.config.fast_dim])
        logits = self.fast_output(h, first_codebook)  # (N, T, C)
        if self.mask_impossible:
            codebooks = torch.arange(first_codebook, first_codebook + h.shape[1], device=h.device)
            logits = logits.masked_fill((codebooks[:, None] >= 1) & self.impossible, float("-inf"))
        return logits

    def fast_next(self, code_N: Tensor, codebook: int, cache: KVCache) -> Tensor:
        """The code of ``codebook - 1`` (N,) at fast position ``codebook`` -> logits of ``codebook`` (N, C);
        ``DualAR.fast_step(fast_embed(code[:, None], codebook - 1), cache)[:, 0]``."""
        cfg, N, p = self.config, code_N.shape[0], codebook
        H, Hkv, Dh = cfg.fast_n_heads, cfg.fast_n_kv_heads, cfg.fast_head_dim
        G = H // Hkv  # query heads per kv head
        x = self.fast_embed(code_N, codebook - 1)  # (N, Df)
        cos, sin = self.fast_cos[p], self.fast_sin[p]  # (1, Dh)
        D, Dh_size = self.sizes[cfg.fast_dim], self.sizes[Dh]
        slots = self.fast_slots(cache)
        for i, layer in enumerate(self.fast_layers):
            q, k_new, v_new = self._qkv(x, layer, (H, Hkv, Dh), D, Dh_size, cos, sin, self.fast_swap)
            k_slot, v_slot, k, v = slots[i][p]  # (N, Hkv, Dh), (N, Hkv, p + 1, Dh)
            k_slot.copy_(k_new)
            v_slot.copy_(v_new.view(N, Hkv, Dh))
            out = F.scaled_dot_product_attention(q.view(N, Hkv, G, Dh), k, v)
            x.add_(torch.mm(out.reshape(N, H * Dh), layer.wo))
            x.add_(self._ffn(x, layer, D))
        cache.length = p + 1
        if self.fast_head is None:
            return self._unshared_logits(x[:, None], codebook)[:, 0]
        return self._fast_logits(x)
