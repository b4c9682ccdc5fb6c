"""A naive Dual-AR generation loop: no cache, the whole sequence recomputed for every frame.

Shape legend: K codebooks, R = 1 + K rows of a frame-token tensor, T prompt positions, n generated frames,
A allowed slow tokens.

This is the reference that the cached inference engine (``engine.py``) must reproduce and that benchmarks
compare it against; it is slow on purpose (quadratic in length) and decodes one sequence. Each step
follows S2's decoding rule (upstream ``decode_one_token_ar``), through the same ``decode_frame`` and
samplers as the engine:

1. run the slow model over prompt + frames so far and take the last position's logits and hidden state;
2. allow only the semantic tokens and ``<|im_end|>``, and draw the token;
3. c0 = clamp(token - semantic_begin_id, 0, C - 1);
4. for k = 1 .. K-1 run the fast model over [hidden, E(c0), .., E(c_{k-1})] (again from scratch) and
   draw c_k from output k (residual codes beyond ``residual_codebook_size`` are -inf);
5. append the column [token, c0, .., c_{K-1}]; stop after ``<|im_end|>`` or ``max_new_tokens`` frames.

The noise of each frame is drawn from ``generator`` exactly as the engine draws a request's noise from its
seed, so the same seed gives the same tokens here and there.

An ``<|im_end|>`` column is stored with zero codes (the frame-token convention) and is not a frame.
Upstream's ``generate_long`` drops the last generated column even when it is a real frame; we keep it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from s2train.inference.engine import Generation
from s2train.inference.sampling import FrameNoise, RowSampler, SamplingParams, SlowVocab, decode_frame
from s2train.models.dual_ar import DualAR


@torch.no_grad()
def generate_naive(
    model: DualAR,
    prompt_RT: Tensor,
    *,
    im_end_id: int,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    sampling: SamplingParams | None = None,
    generator: torch.Generator | None = None,
) -> Generation:
    """Generate the frames that follow ``prompt_RT`` (1 + K, T), greedily (the default) or with
    ``sampling`` and the noise of ``generator``; ``<|im_end|>`` is not drawn before ``min_new_tokens``."""
    cfg = model.config
    sampling = sampling or SamplingParams.greedy()
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
    vocab = SlowVocab.of(cfg, im_end_id, device)
    sampler = RowSampler(1, device)
    sampler.set_row(0, sampling)
    noise = FrameNoise(1, vocab, device)
    if sampling.sampled and generator is None:
        generator = torch.Generator(device).manual_seed(int(torch.randint(2**62, ()).item()))

    sequence = prompt_RT.to(device)  # (R, T + steps so far)
    prompt_len = sequence.shape[1]
    slow_lp, fast_lp = [], []
    stopped = False
    for step in range(max_new_tokens):
        out = model(sequence[None])
        hidden = out.hidden[:, -1]  # (1, D)
        if sampling.sampled:
            noise.fill(0, generator)
        frame = decode_frame(
            out.logits[:, -1, vocab.allowed_ids],  # (1, A)
            lambda k, codes, h=hidden: model.fast_forward(h, codes)[:, k],  # causal: codes k.. unused
            sampler,
            noise,
            vocab,
            torch.tensor([step >= min_new_tokens], device=device),
        )
        sequence = torch.cat([sequence, frame.columns.T], dim=1)
        slow_lp.append(frame.slow_logprob[0])
        if int(frame.columns[0, 0]) == im_end_id:
            stopped = True
            break
        fast_lp.append(frame.fast_logprob[0])
    logprobs = (None, None)
    if sampling.exact:
        logprobs = (
            torch.stack(slow_lp),
            torch.stack(fast_lp) if fast_lp else torch.zeros(0, cfg.num_codebooks - 1),
        )
    return Generation(sequence[:, prompt_len:], stopped, *logprobs)
