"""GRPO rollouts: groups of candidates drawn by the shared engine, and their tokens under a policy.

Shape legend: B candidates, R = 1 + K rows, K codebooks, T positions, V slow vocabulary, N fast rows
(frames of all candidates), C codebook size.

**Drawing** (``draw_groups``): every prompt becomes one ``speech_request`` (the prompt the training
examples use) repeated ``group_size`` times, each copy with its own seed (``candidate_seed``: the run's
seed, the step, the prompt's place and the candidate's), all in one continuously batched
``InferenceEngine.generate`` call in exact mode (``SamplingParams.exact_at``: the untruncated softmax at
the rollout temperatures), which returns the log-probability of every slow token and every fast code.

**The same tokens under the trainer's model** (``candidate_batch`` + ``token_logprobs``): a candidate's
training sequence is its request's prompt followed by the columns it generated, the prompt untrained;
one forward of the slow model over the padded batch, the slow logits restricted to the tokens decoding
may draw (semantic tokens and ``<|im_end|>``) and divided by the temperature, and one teacher-forced
fast pass over the frames, divided by the fast temperature. The engine and the trainer read the same
module, so at the start of a step these equal the rollout's log-probabilities (to float rounding): the
rollout's are the "old" policy of the clipped ratio.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from s2train.inference.engine import Generation, InferenceEngine, speech_request
from s2train.inference.sampling import SamplingParams, allowed_slow_tokens
from s2train.models.dual_ar import DualAR
from s2train.text.prompt import IGNORE, Reference
from s2train.text.tokenizer import TextTokenizer
from s2train.training.dual_ar_loss import select_fast_rows
from s2train.training.lm_data import Collate, PackedSequence


@dataclass
class RolloutPrompt:
    """What a candidate is asked to say, and how."""

    key: str
    text: str
    lang: str = "en"
    references: list[Reference] = field(default_factory=list)  # the voice to clone (codes in the prompt)
    reference_audio: np.ndarray | None = None  # that voice at 16 kHz, for the speaker reward
    caption: str | None = None  # how to speak (the system turn), for the instruction reward
    tags: list[str] = field(default_factory=list)  # inline tags of the text, for the instruction reward


@dataclass
class Candidate:
    prompt_index: int
    candidate: int
    prompt: Tensor  # (R, T): the request's prompt
    generation: Generation  # tokens (R, n), stopped, slow_logprobs (n,), fast_logprobs (frames, K - 1)


def candidate_seed(seed: int, step: int, prompt: int, candidate: int) -> int:
    """A 63-bit seed of its own for every candidate of every step (resume draws the same)."""
    digest = hashlib.sha256(f"grpo/{seed}/{step}/{prompt}/{candidate}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def draw_groups(
    engine: InferenceEngine,
    tokenizer: TextTokenizer,
    prompts: Sequence[RolloutPrompt],
    *,
    group_size: int,
    sampling: SamplingParams,
    max_new_tokens: int,
    seed: int,
    step: int,
    system_turn: bool = True,
) -> list[Candidate]:
    """``group_size`` candidates for every prompt (prompt-major order), drawn in exact mode."""
    if not sampling.exact:
        raise ValueError(
            "GRPO rollouts draw in exact mode (SamplingParams.exact_at): the loss needs their log-probs"
        )
    K = engine.config.num_codebooks
    requests, owners = [], []
    for p, prompt in enumerate(prompts):
        for g in range(group_size):
            requests.append(
                speech_request(
                    tokenizer,
                    prompt.text,
                    K,
                    references=prompt.references,
                    caption=prompt.caption,
                    system_turn=system_turn,
                    max_new_tokens=max_new_tokens,
                    sampling=sampling,
                    seed=candidate_seed(seed, step, p, g),
                )
            )
            owners.append((p, g))
    engine.prefix_cache.clear()  # its keys and values belong to the weights before the last update
    generations = engine.generate(requests)
    return [Candidate(p, g, r.prompt, gen) for (p, g), r, gen in zip(owners, requests, generations)]


def candidate_sequence(prompt: Tensor, tokens: Tensor, is_semantic) -> tuple[Tensor, Tensor]:
    """``(inputs, labels)`` ``(R, T + n - 1)`` of prompt + generated columns: only the generated columns
    are targets (row 0 every token, rows 1..K the codes of the semantic ones)."""
    sequence = torch.cat([prompt, tokens], dim=1)
    T = prompt.shape[1]
    inputs, nxt = sequence[:, :-1], sequence[:, 1:]
    labels = torch.full_like(nxt, IGNORE)
    labels[0, T - 1 :] = nxt[0, T - 1 :]
    semantic = is_semantic(nxt[0, T - 1 :])
    labels[1:, T - 1 :] = torch.where(semantic, nxt[1:, T - 1 :], IGNORE)
    return inputs, labels


def candidate_batch(candidates: Sequence[Candidate], tokenizer: TextTokenizer) -> dict:
    """The candidates as one right-padded training batch (``lm_data.Collate``'s contract), one segment
    each."""
    sequences = []
    for c in candidates:
        inputs, labels = candidate_sequence(c.prompt, c.generation.tokens, tokenizer.is_semantic)
        n = inputs.shape[1]
        sequences.append(
            PackedSequence(
                inputs,
                labels,
                torch.arange(n),
                torch.zeros(n, dtype=torch.long),
                [f"{c.prompt_index}/{c.candidate}"],
                (0, 1, 0, 0, 0),
                ["grpo"],
            )
        )
    return Collate(tokenizer.token_id("<|pad|>"))(sequences)


@dataclass
class TokenLogprobs:
    """Log-probabilities of a batch's trained tokens: slow ones in (candidate, position) order, fast ones
    (frames in the same order) with K - 1 codes each, and which candidate each belongs to."""

    slow: Tensor  # (S,)
    slow_owner: Tensor  # (S,) candidate index
    fast: Tensor  # (N, K - 1)
    fast_owner: Tensor  # (N,)
    slow_entropy: float = float("nan")  # mean entropy of the slow distributions at these tokens
    fast_entropy: float = float("nan")  # ... and of the fast ones

    def flat(self) -> Tensor:
        """(S + N * (K - 1),): slow tokens, then the fast codes frame by frame."""
        return torch.cat([self.slow, self.fast.reshape(-1)])


def token_logprobs(
    model: DualAR, batch: dict, im_end_id: int, temperature: float, fast_temperature: float
) -> TokenLogprobs:
    """The log-probability of every generated slow token and fast code of ``batch`` under ``model`` at the
    rollout temperatures (with a graph when grad is enabled)."""
    cfg = model.config
    labels = batch["labels"]
    out = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    allowed = allowed_slow_tokens(cfg.vocab_size, cfg.semantic_begin_id, cfg.semantic_end_id, im_end_id)
    allowed = allowed.to(out.logits.device)
    trained = labels[:, 0] != IGNORE  # (B, T)
    logits = out.logits[trained]  # (S, V)
    slow = (logits.masked_fill(~allowed, float("-inf")) / temperature).log_softmax(-1)
    slow_lp = slow.gather(-1, labels[:, 0][trained][:, None])[:, 0]
    rows = select_fast_rows(labels, cfg.semantic_begin_id, cfg.semantic_end_id)
    fast_logits = model.fast_forward(out.hidden[rows.mask_BT], rows.codes_NK)  # (N, K, C)
    fast = (fast_logits[:, 1:] / fast_temperature).log_softmax(-1)
    fast_lp = fast.gather(-1, rows.codes_NK[:, 1:, None])[..., 0]  # (N, K - 1)
    owners = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(trained)
    with torch.no_grad():
        slow_h = -(slow.exp() * slow.masked_fill(~allowed, 0.0)).sum(-1).mean()
        terms = torch.where(
            torch.isfinite(fast), fast.exp() * fast, torch.zeros_like(fast)
        )  # masked codes: 0
        fast_h = -terms.sum(-1).mean() if fast.numel() else torch.tensor(float("nan"))
    return TokenLogprobs(
        slow_lp, owners[trained], fast_lp, owners[rows.mask_BT], float(slow_h), float(fast_h)
    )


def rollout_logprobs(candidates: Sequence[Candidate]) -> TokenLogprobs:
    """The engine's log-probabilities of the candidates, laid out as ``token_logprobs`` lays them out."""
    slow, fast, slow_owner, fast_owner = [], [], [], []
    for b, c in enumerate(candidates):
        g = c.generation
        slow.append(g.slow_logprobs)
        fast.append(g.fast_logprobs)
        slow_owner.append(torch.full((len(g.slow_logprobs),), b))
        fast_owner.append(torch.full((len(g.fast_logprobs),), b))
    return TokenLogprobs(torch.cat(slow), torch.cat(slow_owner), torch.cat(fast), torch.cat(fast_owner))
