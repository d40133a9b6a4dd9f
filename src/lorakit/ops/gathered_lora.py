"""Many adapters in one batch: per-row low-rank products from stacked factors (Punica/S-LoRA).

The adapters of one layer are stacked along the rank: A_cat = [A_1; ...; A_n] (R, in) and
B_cat = [s_1 B_1 | ... | s_n B_n] (out, R), R = Σ r_i, each adapter's scale folded into its
columns of B. A row's adapter choice is a coefficient vector c (R) that holds, on adapter i's
r_i columns, the weight w_i the row gives it (1 for a plain adapter, 0 for adapters it does not
use). Then the row's update is

    Δy = B_cat diag(c) A_cat x = Σ_i w_i s_i B_i A_i x,

which is exactly the update of one adapter (c one-hot on a segment), of a blend (the virtual
adapter A = [A_a; A_b], B = [w_a s_a B_a | w_b s_b B_b] of rank r_a + r_b), or of none (c = 0).
Zero coefficients add exact zeros, so a row's result does not depend on the other rows.

Four equal routes compute it for a batch x (rows, seq, in):
- `stacked_lora_delta`: one product with every stacked column, then the coefficients; reads each
  adapter's factors once, best for decoding (seq = 1), where reading weights dominates.
- `gathered_lora_delta`: each row gathers only the k columns it uses (its adapters' rows of
  A_cat and columns of B_cat, zero-coefficient padding to the longest row), then batched
  matmuls; its work does not grow with the adapters loaded.
- `grouped_lora_add_`: when every row uses one adapter (or none) and those adapters share a
  rank r, the rows are regrouped per adapter (n groups of m rows, padded) and two batched
  matmuls run against the stacks viewed as (n, r, in) and (n, r, out), without copying any
  factor, the result added into y in place; each row reads only its own adapter's columns,
  best for mixed decoding, and for prefills whose rows already come in group order.
- `sliced_lora_add_`: when consecutive rows share their choice, each such slice of rows (a
  view of x, no copy) is multiplied by its own adapters' factors (read in place) and the
  result added into y in place; two products per slice and adapter, whatever the other rows
  use, best for prefill (seq > 1), where the products are large.
"""

from __future__ import annotations

import torch


def stacked_lora_delta(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, coefficients: torch.Tensor
) -> torch.Tensor:
    """Δy = ((x A^T) ⊙ c) B^T per row: every row against all stacked columns.

    Shapes: x (rows, seq, in), A (R, in), B (out, R), coefficients (rows, R) -> (rows, seq, out).
    """
    hidden = x @ A.t()  # (rows, seq, R)
    hidden = hidden * coefficients.unsqueeze(1)
    return hidden @ B.t()


def gathered_lora_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    columns: torch.Tensor,
    coefficients: torch.Tensor,
) -> torch.Tensor:
    """Δy = Σ_j c[row, j] · B[:, k_j] (A[k_j] · x) over the k columns k_j each row gathers.

    Shapes: x (rows, seq, in), A (R, in), B (out, R), columns (rows, k) indices into R,
    coefficients (rows, k) -> (rows, seq, out).
    """
    rows, k = columns.shape
    flat = columns.reshape(-1)
    A_rows = A.index_select(0, flat).view(rows, k, A.shape[1])  # (rows, k, in)
    B_rows = B.t().index_select(0, flat).view(rows, k, B.shape[0])  # (rows, k, out)
    hidden = torch.bmm(x, A_rows.transpose(1, 2))  # (rows, seq, k)
    hidden = hidden * coefficients.unsqueeze(1)
    return torch.bmm(hidden, B_rows)


def grouped_lora_add_(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B_t: torch.Tensor,
    sources: torch.Tensor | None,
    weights: torch.Tensor | None,
) -> None:
    """y[row] += w · (x[row] A_gᵀ) B_g for each row, g the group (adapter) of the row, in place.

    The n·m grouped positions hold x[sources[p]] (group p // m); position p's result is
    scaled by weights[p] (0 on padding positions, which may repeat any row: they add exact
    zeros) and added into row sources[p]. sources None: the rows are already grouped in
    order (position p is row p), so no row is copied and the last product adds into y itself.
    weights None: every weight is 1.

    Shapes: y (rows, seq, out) contiguous, x (rows, seq, in), A (n, r, in), B_t (n, r, out)
    (B_g^T per group), sources and weights (n·m,).
    """
    n, _, out_features = B_t.shape
    seq, in_features = x.shape[1:]
    if sources is None:
        grouped = x.reshape(n, -1, in_features)  # (n, m·seq, in), a view for contiguous x
    else:
        grouped = x.index_select(0, sources).view(n, -1, in_features)  # (n, m·seq, in)
    hidden = torch.bmm(grouped, A.transpose(1, 2))  # (n, m·seq, r)
    if weights is not None:
        hidden = (hidden.view(weights.shape[0], seq, -1) * weights.view(-1, 1, 1)).view(
            n, -1, hidden.shape[-1]
        )
    if sources is None:
        y.view(n, -1, out_features).baddbmm_(hidden, B_t)
    else:
        update = torch.bmm(hidden, B_t).view(-1, seq, out_features)  # (n·m, seq, out)
        y.index_add_(0, sources, update)


# One slice of the sliced route: (first row, end row, first stacked row, rank, weight).
Slice = tuple[int, int, int, int, float]


def sliced_lora_add_(
    y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B_t: torch.Tensor, slices: list[Slice]
) -> None:
    """y[i:j] += w · (x[i:j] A[f:f+r]^T) B_t[f:f+r] for every slice (i, j, f, r, w), in place.

    Rows no slice names are left as they are (base rows). A row in several slices (a blend)
    gets each slice's term.

    Shapes: y (rows, seq, out) contiguous, x (rows, seq, in), A (R, in), B_t (R, out) (the
    stacked (s·B)^T).
    """
    in_features, out_features = x.shape[-1], y.shape[-1]
    for first_row, end_row, first, r, weight in slices:
        x_rows = x[first_row:end_row].reshape(-1, in_features)  # (tokens, in), a view
        hidden = x_rows @ A[first : first + r].t()  # (tokens, r)
        y_rows = y[first_row:end_row].view(-1, out_features)  # (tokens, out), a view
        y_rows.addmm_(hidden, B_t[first : first + r], alpha=weight)
