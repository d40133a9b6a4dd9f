"""Choosing each row's next token: greedy, or sampled with temperature, top-k and top-p."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorakit.serve.types import SamplingParams


def request_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's own generator (seeded), or None for greedy requests."""
    if params.is_greedy:
        return None
    generator = torch.Generator(device=device)
    seed = params.seed if params.seed is not None else int(torch.randint(2**62, ()).item())
    generator.manual_seed(seed)
    return generator


def _filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities of logits / temperature over the top-k tokens and the top-p nucleus."""
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass ahead of each token
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return probs


def choose_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> tuple[list[int], list[float | None]]:
    """Next token of every row and, where asked, its log-probability under the model.

    Args:
        logits: (rows, vocab) last-position logits.
        params: Each row's sampling settings.
        generators: Each row's generator (None for greedy rows).

    Returns:
        (token ids, log-probabilities or None per row).
    """
    logits = logits.float()
    tokens: list[int] = []
    logprobs: list[float | None] = []
    greedy = logits.argmax(dim=-1).tolist()
    wants_logprobs = any(p.logprobs for p in params)
    log_softmax = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
    for row, (row_params, generator) in enumerate(zip(params, generators, strict=True)):
        if row_params.is_greedy:
            token = greedy[row]
        else:
            probs = _filtered_probs(logits[row], row_params)
            token = int(torch.multinomial(probs, 1, generator=generator).item())
        tokens.append(token)
        logprobs.append(
            float(log_softmax[row, token])
            if row_params.logprobs and log_softmax is not None
            else None
        )
    return tokens, logprobs
