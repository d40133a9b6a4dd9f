"""Trainable tokens: chosen rows of an embedding (or of a tied output layer) replaced.

With T the (k, d) table of new rows for the token ids `indices` (k of the vocabulary's V):

- embedding: y[p] = T[slot(x[p])] where x[p] is one of `indices`, else W[x[p]];
- output layer (y = x Wᵀ + b): y[..., indices[j]] = x · T[j] + b[indices[j]], the other
  columns unchanged.

Only the k rows take part in the gradient: T's gradient is (k, d), never a (V, d) copy of the
weight or of its gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NOT_TRAINABLE = -1  # slot of a token id whose row is the base's own


def token_slots(indices: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(V,) int64: the position of each token id in `indices`, `NOT_TRAINABLE` elsewhere."""
    slots = torch.full((num_rows,), NOT_TRAINABLE, dtype=torch.long, device=indices.device)
    slots[indices] = torch.arange(indices.numel(), device=indices.device)
    return slots


def embed_with_rows(
    result: torch.Tensor,
    x: torch.Tensor,
    slots: torch.Tensor,
    T: torch.Tensor,
    padding_slot: int | None = None,
    scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """y = result where x's token has no new row, else T[slot] (times the embedding's scale).

    Args:
        result: (..., d) the base embedding's output for `x`.
        x: (...) token ids.
        slots: (V,) from `token_slots`.
        T: (k, d) the new rows.
        padding_slot: T's row of the embedding's `padding_idx`, which gets no gradient.
        scale: A factor the base applies to every looked-up row (e.g. Gemma's `embed_scale`).
    """
    slot = slots[x]  # (...)
    is_new = slot >= 0
    rows = F.embedding(slot.clamp(min=0), T, padding_idx=padding_slot)  # (..., d)
    if scale is not None:
        rows = rows * scale
    return torch.where(is_new.unsqueeze(-1), rows.to(result.dtype), result)


def project_with_rows(
    result: torch.Tensor,
    x: torch.Tensor,
    indices: torch.Tensor,
    T: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = result with the output columns `indices` recomputed as x · Tᵀ (+ b[indices]).

    Args:
        result: (..., V) the base linear layer's output for `x`.
        x: (..., d) its input.
        indices: (k,) the token ids (output features) with new rows.
        T: (k, d) the new rows of the weight.
        bias: (V,) the layer's bias, or None.
    """
    columns = F.linear(x, T.to(x.dtype), None if bias is None else bias[indices])  # (..., k)
    return result.index_copy(-1, indices, columns.to(result.dtype))


def weight_with_rows(W: torch.Tensor, indices: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """W (V, d) with rows `indices` replaced by T (out of place)."""
    return W.index_copy(0, indices, T.to(W.dtype))
