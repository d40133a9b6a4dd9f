"""torch.compile of a lorakit model: eager outputs and gradients, and no recompiles on switching.

The backend is "aot_eager": dynamo's graph capture and AOT autograd (what inductor sees too)
without inductor's C++ build, which takes ~20 s on this CPU (inductor gave the same loss to
5e-7 and gradients to 3e-8 when checked by hand).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import lorakit
from tiny_models import tiny_llama, tiny_vit, token_batch

BACKEND = "aot_eager"
# fp32: the same ops in the same order, so equal in practice; 1e-5 allows reassociation.
COMPILE_TOL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _model_with_two_adapters() -> lorakit.PeftModel:
    torch.manual_seed(0)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    model = lorakit.get_peft_model(tiny_llama(), config)
    model.add_adapter("other", copy.deepcopy(config))
    return model


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()
    counters.clear()


def test_compiled_training_step_matches_eager() -> None:
    eager = _model_with_two_adapters().train()
    compiled_source = copy.deepcopy(eager)
    compiled = torch.compile(compiled_source, backend=BACKEND)
    x = token_batch()
    eager_loss = eager(input_ids=x, labels=x).loss
    eager_loss.backward()
    compiled_loss = compiled(input_ids=x, labels=x).loss
    compiled_loss.backward()
    assert abs(compiled_loss.item() - eager_loss.item()) <= COMPILE_TOL
    pairs = zip(eager.named_parameters(), compiled_source.named_parameters(), strict=True)
    grads = [(p.grad, q.grad) for (_, p), (_, q) in pairs if p.requires_grad]
    assert grads and all(q is not None for _, q in grads)
    assert max((p - q).abs().max().item() for p, q in grads) <= COMPILE_TOL
    assert not counters["graph_break"]  # one graph: the LoRA path does not break it


def _compiled_graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def test_switching_adapters_of_one_shape_compiles_one_graph() -> None:
    torch.manual_seed(0)
    options = {"r": 4, "target_modules": TARGETS, "init_lora_weights": False}
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(lora_alpha=8, **options))
    # Same shapes; other scales: 32/4, and 5/sqrt(4) with rsLoRA.
    model.add_adapter("other", lorakit.LoraConfig(lora_alpha=32, **options))
    model.add_adapter("rslora", lorakit.LoraConfig(lora_alpha=5, use_rslora=True, **options))
    model.eval()
    names = ("default", "other", "rslora")
    x = token_batch()
    with torch.no_grad():
        eager = {}
        for name in names:
            model.set_adapter(name)
            eager[name] = model(input_ids=x).logits
        compiled = torch.compile(model, backend=BACKEND)
        for step in range(9):  # default, other, rslora, default, ...
            name = names[step % 3]
            model.set_adapter(name)
            output = compiled(input_ids=x).logits
            assert (output - eager[name]).abs().max().item() <= COMPILE_TOL
            assert _compiled_graphs() == 1  # the first call compiled it; no switch adds one
    assert counters["frames"]["total"] == 1
    for first, second in (("default", "other"), ("default", "rslora"), ("other", "rslora")):
        assert (eager[first] - eager[second]).abs().max().item() > 100 * COMPILE_TOL


def test_switching_trains_the_active_adapter_under_one_graph() -> None:
    eager = _model_with_two_adapters().train()
    compiled_source = copy.deepcopy(eager)
    compiled = torch.compile(compiled_source, backend=BACKEND)
    x = token_batch()
    for name in ("default", "other", "default"):
        for model in (eager, compiled_source):
            model.set_adapter(name)
            model.zero_grad(set_to_none=True)
        eager(input_ids=x, labels=x).loss.backward()
        compiled(input_ids=x, labels=x).loss.backward()
        eager_grads = {k: p.grad for k, p in eager.named_parameters() if p.grad is not None}
        compiled_grads = {
            k: p.grad for k, p in compiled_source.named_parameters() if p.grad is not None
        }
        # Only the active adapter's A and B get gradients, in both.
        assert eager_grads.keys() == compiled_grads.keys()
        assert eager_grads and all(f".{name}." in key for key in eager_grads)
        for key, grad in eager_grads.items():
            assert (compiled_grads[key] - grad).abs().max().item() <= COMPILE_TOL
    assert _compiled_graphs() == 1


def test_adapters_of_other_ranks_compile_one_graph_per_shape() -> None:
    torch.manual_seed(0)
    options = {"lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False}
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=4, **options))
    model.add_adapter("rank8", lorakit.LoraConfig(r=8, **options))
    model.add_adapter("also_rank4", lorakit.LoraConfig(r=4, **options))
    model.eval()
    x = token_batch()
    graphs = []
    with torch.no_grad():
        compiled = torch.compile(model, backend=BACKEND)
        for name in ("default", "rank8", "also_rank4", "rank8", "default"):
            model.set_adapter(name)
            compiled(input_ids=x)
            graphs.append(_compiled_graphs())
    assert graphs == [1, 2, 2, 2, 2]  # a new rank's shapes are guarded: one graph for rank 8


def test_disabling_and_merging_under_compile_give_the_eager_outputs() -> None:
    model = _model_with_two_adapters().eval()
    x = token_batch()
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        with model.disable_adapter():
            bare = model(input_ids=x).logits
        compiled = torch.compile(model, backend=BACKEND)
        with model.disable_adapter():
            assert torch.allclose(compiled(input_ids=x).logits, bare, atol=COMPILE_TOL)
        assert torch.allclose(compiled(input_ids=x).logits, adapted, atol=COMPILE_TOL)
        model.merge_adapter()  # the adapter now sits in the base weights: not added again
        assert torch.allclose(compiled(input_ids=x).logits, adapted, atol=COMPILE_TOL)
        model.unmerge_adapter()
        model.set_adapter("other")
        model.set_adapter("default")
        assert torch.allclose(compiled(input_ids=x).logits, adapted, atol=COMPILE_TOL)
    assert (adapted - bare).abs().max().item() > 100 * COMPILE_TOL


def _graphs_over_switches(
    model: lorakit.PeftModel, inputs: dict[str, torch.Tensor]
) -> tuple[int, float]:
    """(graphs compiled, largest compiled-vs-eager difference) over default/other switches."""
    model.eval()
    with torch.no_grad():
        eager = {}
        for name in ("default", "other"):
            model.set_adapter(name)
            eager[name] = model(**inputs).logits
        assert (eager["default"] - eager["other"]).abs().max().item() > 100 * COMPILE_TOL
        compiled = torch.compile(model, backend=BACKEND)
        worst = 0.0
        for step in range(6):
            name = ("default", "other")[step % 2]
            model.set_adapter(name)
            output = compiled(**inputs).logits
            worst = max(worst, (output - eager[name]).abs().max().item())
    return _compiled_graphs(), worst


def _two_adapters(base: torch.nn.Module, targets: list[str]) -> lorakit.PeftModel:
    torch.manual_seed(0)
    options = {"r": 4, "target_modules": targets, "init_lora_weights": False}
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(lora_alpha=8, **options))
    model.add_adapter("other", lorakit.LoraConfig(lora_alpha=32, **options))
    return model


def test_conv_adapters_switch_under_one_graph() -> None:
    model = _two_adapters(tiny_vit(), ["projection", "q_proj"])  # the patch Conv2d and linears
    assert isinstance(
        model.get_submodule("base_model.model.vit.embeddings.patch_embeddings.projection"),
        lorakit.layers.LoraConv,
    )
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    graphs, worst = _graphs_over_switches(model, {"pixel_values": pixels})
    assert worst <= COMPILE_TOL
    assert graphs == 1


def _embedding_model() -> lorakit.PeftModel:
    return _two_adapters(tiny_llama(), ["embed_tokens", "q_proj"])


EMBED_PATH = "base_model.model.model.embed_tokens"


def test_embedding_adapters_switch_under_one_graph_with_peft_keys() -> None:
    """PEFT's keys put embedding tables straight in ParameterDicts keyed by adapter name; a
    forward reads each through its adapter's module under one name, so no name is guarded."""
    peft = pytest.importorskip("peft")
    model = _embedding_model()
    assert isinstance(model.get_submodule(EMBED_PATH), lorakit.layers.LoraEmbedding)
    options = {"r": 4, "target_modules": ["embed_tokens", "q_proj"], "init_lora_weights": False}
    reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**options))
    reference.add_adapter("other", peft.LoraConfig(**options))
    ours = [key for key in model.state_dict() if "lora_embedding" in key]
    assert ours == [key for key in reference.state_dict() if "lora_embedding" in key]
    assert f"{EMBED_PATH}.lora_embedding_A.other" in ours
    assert [name for name, _ in model.named_parameters() if "lora_embedding" in name] == ours
    graphs, worst = _graphs_over_switches(model, {"input_ids": token_batch()})
    assert worst <= COMPILE_TOL
    assert graphs == 1
    assert counters["frames"]["total"] == 1


def test_switching_trains_the_active_embedding_adapter_under_one_graph() -> None:
    eager = _embedding_model().train()
    compiled_source = copy.deepcopy(eager)
    compiled = torch.compile(compiled_source, backend=BACKEND)
    x = token_batch()
    for name in ("default", "other", "default"):
        for model in (eager, compiled_source):
            model.set_adapter(name)
            model.zero_grad(set_to_none=True)
        eager(input_ids=x, labels=x).loss.backward()
        compiled(input_ids=x, labels=x).loss.backward()
        eager_grads = {k: p.grad for k, p in eager.named_parameters() if p.grad is not None}
        compiled_grads = {
            k: p.grad for k, p in compiled_source.named_parameters() if p.grad is not None
        }
        assert eager_grads.keys() == compiled_grads.keys()
        assert f"{EMBED_PATH}.lora_embedding_A.{name}" in eager_grads
        assert all(key.endswith(name) or f".{name}." in key for key in eager_grads)
        for key, grad in eager_grads.items():
            assert (compiled_grads[key] - grad).abs().max().item() <= COMPILE_TOL, key
    assert _compiled_graphs() == 1


def _mirrors_hold_the_tables(layer: torch.nn.Module) -> bool:
    return all(
        tables.mirror(name)._parameters["weight"] is tables[name]
        for tables in (layer.lora_embedding_A, layer.lora_embedding_B)
        for name in ("default", "other")
    )


def test_replaced_and_copied_embedding_tables_are_what_a_forward_reads() -> None:
    """Tables replaced in their ParameterDict (a load with assign=True), and a deep copy's or
    an unpickled model's tables, are the ones the forward reads (eager and compiled forwards
    read the same per-adapter modules): compared with a model given the values in place."""
    model = _embedding_model().eval()
    x = token_batch()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        new = {
            key: torch.randn(value.shape, generator=generator)
            for key, value in model.state_dict().items()
            if "lora_embedding" in key
        }
        model.load_state_dict(new, strict=False, assign=True)
        layer = model.get_submodule(EMBED_PATH)
        replaced = layer.lora_embedding_A["default"]
        assert replaced.data_ptr() == new[f"{EMBED_PATH}.lora_embedding_A.default"].data_ptr()
        oracle = _embedding_model().eval()
        for key, value in new.items():
            oracle.get_parameter(key).copy_(value)
        copied = copy.deepcopy(model)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        unpickled = torch.load(buffer, weights_only=False)
        for each in (model, copied, unpickled):
            assert _mirrors_hold_the_tables(each.get_submodule(EMBED_PATH))
        for other in (copied, unpickled):
            assert other.get_parameter(f"{EMBED_PATH}.lora_embedding_A.default") is not replaced
        for name in ("default", "other"):
            for each in (model, oracle, copied, unpickled):
                each.set_adapter(name)
            expected = oracle(input_ids=x).logits
            for each in (model, copied, unpickled):
                assert (each(input_ids=x).logits - expected).abs().max().item() <= COMPILE_TOL
        layer.lora_embedding_B["other"].zero_()  # the copies keep their own tables
        assert (copied(input_ids=x).logits - model(input_ids=x).logits).abs().max() > 1e-3
        del layer.lora_embedding_A["other"]
        assert "other" not in layer.lora_embedding_A._parameters.mirrors
