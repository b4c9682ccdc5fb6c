"""The Dual-AR training loss, as upstream fish-speech defines it, and the selection of the fast rows.

Shape legend: B batch, T positions, R = 1 + K label rows, K codebooks, V slow vocabulary,
C fast vocabulary, N fast rows (positions whose next token is semantic).

Labels (B, 1 + K, T) hold the next frame: row 0 the next token id, rows 1..K its codes where that token is
semantic, and -100 wherever nothing is to be learned. With ``ignore = labels == -100``::

    loss/slow  = mean over not-ignored (b, t) of CE(slow_logits[b, t], labels[b, 0, t])
    loss/fast  = mean over not-ignored (n, k) of CE(fast_logits[n, k], codes[n, k]),
                 k = 0 .. K-1 (output 0 predicts c0 from the hidden state alone), or 1 .. K-1 without c0
    loss/total = weights["loss/slow"] * loss/slow + weights["loss/fast"] * loss/fast

Upstream calls these base and semantic loss and adds them with weight 1 each, c0 included. The fast
rows are the positions whose label row 0 is semantic, in (batch, position) order: ``select_fast_rows``
gives the same selection to the trainer (to build the fast model's input) and to the loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from s2train.text.prompt import IGNORE  # the label of a position that is not trained

LOSS_WEIGHTS = {"loss/slow": 1.0, "loss/fast": 1.0}  # keyed like the logged losses they weight


class FastRows(NamedTuple):
    mask_BT: Tensor  # bool (B, T): label row 0 is a semantic token
    codes_NK: Tensor  # (N, K): that frame's codes, the fast model's targets (and teacher-forcing inputs)


def select_fast_rows(labels_BRT: Tensor, semantic_begin_id: int, semantic_end_id: int) -> FastRows:
    """The positions whose next token is semantic and the codes of that frame, in (batch, position) order.

    The trainer runs ``model.fast_forward(hidden[rows.mask_BT], rows.codes_NK)`` on them.
    """
    next_token = labels_BRT[:, 0]  # (B, T)
    mask = (next_token >= semantic_begin_id) & (next_token <= semantic_end_id)  # (B, T)
    return FastRows(mask, labels_BRT[:, 1:].transpose(1, 2)[mask])  # (N, K)


def _mean(values: Tensor, valid: Tensor) -> Tensor:
    """Sum of values over valid entries / their count; 0 (with a graph) when none is valid."""
    return (values * valid).sum() / valid.sum().clamp_min(1)


def dual_ar_loss(
    slow_logits_BTV: Tensor,
    fast_logits_NKC: Tensor,
    labels_BRT: Tensor,
    semantic_begin_id: int,
    semantic_end_id: int,
    *,
    weights: Mapping[str, float] | None = None,
    include_c0: bool = True,
) -> dict[str, Tensor]:
    """Losses and accuracies keyed for logging (formulas in the module docstring).

    slow_logits (B, T, V); fast_logits (N, K, C) for the rows ``select_fast_rows`` picks from labels;
    labels (B, 1 + K, T) with -100 to ignore. ``weights`` overrides entries of ``LOSS_WEIGHTS``.
    Returns "loss/total", "loss/slow", "loss/fast" (with gradients), and, detached,
    "loss/codebook_k", "acc/codebook_k" (k = 0 .. K-1) and "acc/slow". A term with nothing to learn is 0.
    """
    unknown = set(weights or {}) - set(LOSS_WEIGHTS)
    if unknown:
        raise ValueError(
            f"unknown Dual-AR loss weights {sorted(unknown)}; the weighted losses are {sorted(LOSS_WEIGHTS)}"
        )
    weight = {**LOSS_WEIGHTS, **(weights or {})}
    codes = select_fast_rows(labels_BRT, semantic_begin_id, semantic_end_id).codes_NK  # (N, K)
    if fast_logits_NKC.shape[:2] != codes.shape:
        raise ValueError(
            f"fast logits {tuple(fast_logits_NKC.shape)} do not match the {codes.shape[0]} semantic label "
            f"rows x {codes.shape[1]} codebooks that select_fast_rows finds"
        )

    slow_targets = labels_BRT[:, 0]  # (B, T)
    slow_valid = slow_targets != IGNORE
    slow_ce = F.cross_entropy(
        slow_logits_BTV.flatten(0, 1), slow_targets.flatten(), ignore_index=IGNORE, reduction="none"
    ).view_as(slow_targets)  # (B, T)
    fast_valid = codes != IGNORE  # (N, K)
    fast_ce = F.cross_entropy(
        fast_logits_NKC.flatten(0, 1), codes.flatten(), ignore_index=IGNORE, reduction="none"
    ).view_as(codes)  # (N, K)
    trained = fast_valid.clone()
    if not include_c0:
        trained[:, 0] = False

    out = {"loss/slow": _mean(slow_ce, slow_valid), "loss/fast": _mean(fast_ce, trained)}
    out["loss/total"] = weight["loss/slow"] * out["loss/slow"] + weight["loss/fast"] * out["loss/fast"]
    with torch.no_grad():
        out["acc/slow"] = _mean((slow_logits_BTV.argmax(-1) == slow_targets).float(), slow_valid)
        fast_hit = (fast_logits_NKC.argmax(-1) == codes).float()  # (N, K)
        for k in range(codes.shape[1]):
            out[f"loss/codebook_{k}"] = _mean(fast_ce[:, k], fast_valid[:, k])
            out[f"acc/codebook_{k}"] = _mean(fast_hit[:, k], fast_valid[:, k])
    return out
