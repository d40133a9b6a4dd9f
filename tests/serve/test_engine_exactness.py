"""The engine's outputs equal the merged models': mixed batches, blends, joins mid-way.

References are built by hand in the test: base weights + Σ wᵢ · sᵢ BᵢAᵢ from each adapter's
files in float64 (`engine_support.merged_by_hand`), then transformers' greedy `generate`.
lorakit's `add_weighted_adapter(..., "linear")` is not that sum (it adds the A's and the B's
separately), so it is not the reference for blends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch

import lorakit.serve.routing as routing_module
from engine_support import (
    byte_llama,
    byte_tokenizer,
    greedy_reference,
    merged_by_hand,
    reference_logprobs,
    save_adapter,
)
from lorakit.serve import Engine, SamplingParams

# fp32: the engine adds the low-rank update to the base output; the reference merges it into W.
FP32_LOGITS_ATOL = 1e-4
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    folders = {
        "qv4": save_adapter(
            byte_llama, root / "qv4", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
        ),
        "all8": save_adapter(
            byte_llama,
            root / "all8",
            2,
            r=8,
            lora_alpha=16,
            target_modules="all-linear",
            use_rslora=True,
        ),
        "pattern": save_adapter(
            byte_llama,
            root / "pattern",
            3,
            r=4,
            lora_alpha=4,
            target_modules=["q_proj", "o_proj", "up_proj", "down_proj"],
            rank_pattern={"down_proj": 6},
            alpha_pattern={"o_proj": 12},
        ),
    }
    torch.manual_seed(4)
    peft_config = peft.LoraConfig(
        r=6, lora_alpha=9, init_lora_weights=False, target_modules=["k_proj", "o_proj", "gate_proj"]
    )
    model = peft.get_peft_model(byte_llama(), peft_config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.3)
    model.save_pretrained(root / "peft6")
    folders["peft6"] = root / "peft6"
    return folders


def _engine(adapters: dict[str, Path], **options: Any) -> Engine:
    engine = Engine.from_pretrained(byte_llama(), byte_tokenizer(), **options)
    for name, folder in adapters.items():
        engine.load_adapter(name, folder)
    return engine


def _reference_model(spec: Any, adapters: dict[str, Path]) -> torch.nn.Module:
    if spec is None:
        return byte_llama()
    blend = {spec: 1.0} if isinstance(spec, str) else spec
    return merged_by_hand(byte_llama(), {adapters[name]: w for name, w in blend.items()})


FIRST_WAVE = [(None, 5), ("qv4", 9), ("all8", 3), ({"qv4": 0.7, "all8": 0.5}, 6)]
SECOND_WAVE = [
    ("pattern", 7),
    ("peft6", 4),
    ({"all8": 1.0, "peft6": -0.4, "pattern": 0.3}, 8),
    (None, 2),
]


def _prompt(length: int, salt: int) -> list[int]:
    return [(37 * i + 11 * salt) % 250 + 3 for i in range(length)]


@pytest.mark.parametrize("route", ["stacked", "gathered", "grouped", "sliced"])
def test_continuous_mixed_batch_greedy_tokens_and_logprobs_equal_merged_models(
    adapters: dict[str, Path], route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One route everywhere it can run (grouped: where every row uses one adapter of one
    # rank, in decoding steps or on rows in group order; gathered elsewhere), counted.
    taken: list[str] = []

    def forced_route(plan: routing_module.RowPlan, rows: int, seq: int) -> str:
        grouped = plan.grouped
        can_group = grouped is not None and (seq == 1 or grouped.sources is None)
        chosen = route if route != "grouped" or can_group else "gathered"
        taken.append(chosen)
        return chosen

    monkeypatch.setattr(routing_module.RowPlan, "route", forced_route)
    engine = _engine(adapters)
    sampling = SamplingParams(max_tokens=MAX_TOKENS, logprobs=True)
    requests = []
    for salt, (spec, length) in enumerate(FIRST_WAVE):
        requests.append(
            (spec, _prompt(length, salt), engine.submit(_prompt(length, salt), spec, sampling))
        )
    for _ in range(3):  # three steps run before the second wave joins the running batch
        engine._run_steps(1)
    assert engine.stats()["running"] == len(FIRST_WAVE)
    for salt, (spec, length) in enumerate(SECOND_WAVE, start=len(FIRST_WAVE)):
        requests.append(
            (spec, _prompt(length, salt), engine.submit(_prompt(length, salt), spec, sampling))
        )
    engine._run_steps(1)
    assert engine.stats()["batch_size_last"] == len(FIRST_WAVE) + len(SECOND_WAVE)
    engine._run_inline([handle for _, _, handle in requests])
    distinct = set()
    for spec, prompt, handle in requests:
        events = list(handle)
        tokens = [e.token_id for e in events]
        reference = _reference_model(spec, adapters)
        assert tokens == greedy_reference(reference, prompt, MAX_TOKENS), spec
        expected = reference_logprobs(reference, prompt, tokens)
        got = [e.logprob for e in events]
        assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < FP32_LOGITS_ATOL
        distinct.add(tuple(tokens))
    assert len(distinct) >= 6  # the adapters and blends do change the answers
    # The route ran in several layers and steps (grouped only where no row blends).
    assert taken.count(route) >= 8


@pytest.mark.parametrize("products", ["auto", "onednn"])
def test_mixed_batch_forward_logits_equal_merged_models_within_1e_4(
    adapters: dict[str, Path], products: str, request: pytest.FixtureRequest
) -> None:
    if products == "onednn":  # every base product through oneDNN, as on the benchmark model
        request.getfixturevalue("onednn_everywhere")
    engine = _engine(adapters)
    specs = [
        None,
        "qv4",
        "all8",
        "pattern",
        "peft6",
        {"qv4": 0.7, "all8": 0.5},
        {"all8": 1.0, "peft6": -0.4, "pattern": 0.3},
        "qv4",
    ]
    prompts = [_prompt(3 + 2 * i, i) for i in range(len(specs))]
    logits = engine.prompt_logits(prompts, specs)
    for spec, prompt, got in zip(specs, prompts, logits, strict=True):
        with torch.no_grad():
            expected = _reference_model(spec, adapters)(torch.tensor([prompt])).logits[0]
        assert got.shape == expected.shape
        assert (got - expected).abs().max() < FP32_LOGITS_ATOL, spec
    base_gap = (logits[1] - engine.prompt_logits([prompts[1]], [None])[0]).abs().max()
    assert base_gap > 0.1  # the adapter row is not the base


def test_blend_of_one_adapter_with_weight_one_equals_the_adapter_and_weight_zero_the_base(
    adapters: dict[str, Path],
) -> None:
    engine = _engine(adapters)
    prompt = _prompt(6, 9)
    plain, one, zero, base = engine.prompt_logits(
        [prompt] * 4, ["all8", {"all8": 1.0}, {"all8": 0.0}, None]
    )
    assert torch.equal(plain, one)
    assert torch.equal(zero, base)
