"""A naive Dual-AR generation loop: no cache, the whole sequence recomputed for every frame.

Shape legend: K codebooks, R = 1 + K rows of a frame-token tensor, T prompt positions, n generated frames,
V slow vocabulary, C codebook size.

This is the reference that the cached inference engine must reproduce and that benchmarks compare it
against; it is slow on purpose (quadratic in length) and decodes one sequence. Each step follows S2's
decoding rule (upstream ``decode_one_token_ar``):

1. run the slow model over prompt + frames so far and take the last position's logits and hidden state;
2. allow only the semantic tokens and ``<|im_end|>``, and sample the token;
3. c0 = clamp(token - semantic_begin_id, 0, C - 1);
4. for k = 1 .. K-1 run the fast model over [hidden, E(c0), .., E(c_{k-1})] (again from scratch) and
   sample c_k from output k (residual codes beyond ``residual_codebook_size`` are -inf);
5. append the column [token, c0, .., c_{K-1}]; stop after ``<|im_end|>`` or ``max_new_tokens`` frames.

An ``<|im_end|>`` column is stored with zero codes (the frame-token convention) and is not a frame.
Upstream's ``generate_long`` drops the last generated column even when it is a real frame; we keep it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from s2train.inference.sampling import allowed_slow_tokens, sample
from s2train.models.dual_ar import DualAR


@dataclass
class Generation:
    tokens: Tensor  # (1 + K, n): the columns appended after the prompt
    stopped: bool  # True when generation ended on <|im_end|>, False when it hit max_new_tokens

    @property
    def codes(self) -> Tensor:
        """(K, frames): the generated frames' codes, without the ending <|im_end|> column."""
        frames = self.tokens[:, :-1] if self.stopped else self.tokens
        return frames[1:]


@torch.no_grad()
def generate_naive(
    model: DualAR,
    prompt_RT: Tensor,
    *,
    im_end_id: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Generation:
    """Generate the frames that follow ``prompt_RT`` (1 + K, T), greedily (temperature 0) or by sampling
    with ``generator`` (the same temperature, top-k and top-p for the slow token and every code)."""
    cfg = model.config
    if prompt_RT.dim() != 2 or prompt_RT.shape[0] != 1 + cfg.num_codebooks:
        raise ValueError(
            f"the prompt must be (1 + K, T) with K = {cfg.num_codebooks}, not {tuple(prompt_RT.shape)}"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    if prompt_RT.shape[1] + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"a {prompt_RT.shape[1]}-position prompt plus {max_new_tokens} new frames exceeds the model's "
            f"max_seq_len {cfg.max_seq_len}"
        )
    device = model.slow.embeddings.weight.device
    allowed = allowed_slow_tokens(cfg.vocab_size, cfg.semantic_begin_id, cfg.semantic_end_id, im_end_id).to(
        device
    )
    draw = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

    sequence = prompt_RT.to(device)  # (R, T + steps so far)
    prompt_len = sequence.shape[1]
    stopped = False
    for _ in range(max_new_tokens):
        out = model(sequence[None])
        logits = out.logits[:, -1].masked_fill(~allowed, float("-inf"))  # (1, V)
        token = sample(logits, **draw)  # (1,)
        column = torch.zeros(1 + cfg.num_codebooks, dtype=torch.long, device=device)
        column[0] = token[0]
        if token.item() == im_end_id:
            sequence = torch.cat([sequence, column[:, None]], dim=1)
            stopped = True
            break
        codes = torch.zeros(1, cfg.num_codebooks, dtype=torch.long, device=device)  # (1, K)
        codes[:, 0] = (token - cfg.semantic_begin_id).clamp(0, cfg.codebook_size - 1)
        for k in range(1, cfg.num_codebooks):
            # Causal, so the not-yet-drawn codes k.. (zeros) do not affect output k.
            codes[:, k] = sample(model.fast_forward(out.hidden[:, -1], codes)[:, k], **draw)
        column[1:] = codes[0]
        sequence = torch.cat([sequence, column[:, None]], dim=1)
    return Generation(sequence[:, prompt_len:], stopped)
