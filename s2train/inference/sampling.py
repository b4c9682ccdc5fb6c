"""Token samplers and the S2 decoding constraint. Shape legend: N rows, V vocabulary (or codebook) size."""

from __future__ import annotations

import torch
from torch import Tensor


def allowed_slow_tokens(
    vocab_size: int, semantic_begin_id: int, semantic_end_id: int, im_end_id: int
) -> Tensor:
    """Bool (V,): the tokens S2 decoding may emit in an assistant voice turn: semantic tokens and <|im_end|>."""
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    allowed[semantic_begin_id : semantic_end_id + 1] = True
    allowed[im_end_id] = True
    return allowed


def sample(
    logits_NV: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token per row (N,) from logits (N, V).

    temperature 0 is greedy (argmax). Otherwise, in upstream's order: sort; drop the tokens after the
    cumulative probability of the untempered distribution exceeds ``top_p`` (the first is always kept);
    keep at most ``top_k``; divide by the temperature; draw from the softmax with ``generator``.
    With ``top_k=1`` every temperature gives the argmax.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, not {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, not {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], not {top_p}")
    if temperature == 0:
        return logits_NV.argmax(-1)
    sorted_logits, order = logits_NV.float().sort(dim=-1, descending=True)  # (N, V)
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_p is not None and top_p < 1:
        drop = sorted_logits.softmax(-1).cumsum(-1) > top_p
    if top_k is not None:
        drop[:, top_k:] = True
    drop[:, 0] = False
    probs = (sorted_logits.masked_fill(drop, float("-inf")) / temperature).softmax(-1)
    picked = torch.multinomial(probs, 1, generator=generator)  # (N, 1) index into the sorted order
    return order.gather(-1, picked).squeeze(-1)
