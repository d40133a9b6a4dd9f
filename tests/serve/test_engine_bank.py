"""The banks' stacks: a load writes only its own rows, unloads free rows for reuse, exactness."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import lorakit.serve.routing as routing_module
from engine_support import (
    byte_llama,
    byte_tokenizer,
    greedy_reference,
    merged_by_hand,
    save_adapter,
)
from lorakit.errors import ServeError
from lorakit.io.errors import CorruptAdapterFileError
from lorakit.ops.gathered_lora import Slice, grouped_lora_add_, sliced_lora_add_
from lorakit.serve import Engine, SamplingParams
from lorakit.serve.bank import AdapterBank
from lorakit.serve.types import AdapterSpec

FP32_LOGITS_ATOL = 1e-4
QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four adapters on q_proj and v_proj: ranks 4, 8, 4, 6."""
    root = tmp_path_factory.mktemp("bank_adapters")
    ranks = {"a": 4, "b": 8, "c": 4, "d": 6}
    return {
        name: save_adapter(byte_llama, root / name, seed, r=r, lora_alpha=8, target_modules=QV)
        for seed, (name, r) in enumerate(ranks.items())
    }


def _engine(reserve_rank: int = 0) -> Engine:
    return Engine.from_pretrained(byte_llama(), byte_tokenizer(), reserve_rank=reserve_rank)


def _q_proj(engine: Engine) -> AdapterBank:
    bank = engine.model.model.layers[0].self_attn.q_proj
    assert isinstance(bank, AdapterBank)
    return bank


def _rows(bank: AdapterBank, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    assert bank.A is not None and bank.B_t is not None
    _, start, r = next(s for s in bank.layout if s[0] == name)
    return bank.A[start : start + r].clone(), bank.B_t[start : start + r].clone()


def _merged_reference(folders: dict[str, Path], spec: AdapterSpec) -> torch.nn.Module:
    """The byte Llama with the adapter or blend `spec` merged in by hand (None: the base)."""
    blend = {} if spec is None else {spec: 1.0} if isinstance(spec, str) else spec
    return merged_by_hand(byte_llama(), {folders[name]: w for name, w in blend.items()})


def _assert_greedy_equals_merged(
    folders: dict[str, Path],
    specs: list[AdapterSpec],
    prompts: list[list[int]],
    handles: list[Any],
    max_tokens: int,
) -> None:
    """Each finished request's tokens are greedy `generate` of its merged reference."""
    for spec, prompt, handle in zip(specs, prompts, handles, strict=True):
        reference = _merged_reference(folders, spec)
        assert [e.token_id for e in handle] == greedy_reference(reference, prompt, max_tokens)


def test_with_a_reserve_a_load_writes_only_its_rows_into_the_same_storage(
    folders: dict[str, Path],
) -> None:
    engine = _engine(reserve_rank=16)
    engine.load_adapter("a", folders["a"])
    bank = _q_proj(engine)
    assert bank.A is not None and bank.B_t is not None
    storage = (bank.A.data_ptr(), bank.B_t.data_ptr())
    assert bank.capacity == 16 and bank.layout == (("a", 0, 4),)
    rows_a = _rows(bank, "a")
    engine.load_adapter("b", folders["b"])
    assert (bank.A.data_ptr(), bank.B_t.data_ptr()) == storage  # nothing reallocated or copied
    assert bank.layout == (("a", 0, 4), ("b", 4, 8)) and bank.capacity == 16
    assert all(torch.equal(x, y) for x, y in zip(_rows(bank, "a"), rows_a, strict=True))
    assert torch.count_nonzero(bank.A[12:]) == 0 and torch.count_nonzero(bank.B_t[12:]) == 0
    owned, free = engine._banks.factor_bytes()
    # A row of every bank: q_proj (in 32, out 32) and v_proj (32, 16), fp32, in 2 layers.
    row_bytes = ((32 + 32) + (32 + 16)) * 4 * 2
    assert (owned, free) == (12 * row_bytes, 4 * row_bytes)
    # Past the reserve the stacks double: the others' rows are copied once, unchanged.
    engine.load_adapter("d", folders["d"])
    assert bank.capacity == 32 and bank.A.data_ptr() != storage[0]
    assert all(torch.equal(x, y) for x, y in zip(_rows(bank, "a"), rows_a, strict=True))


def test_without_a_reserve_stacks_double_when_full_and_loads_that_fit_copy_nothing(
    folders: dict[str, Path],
) -> None:
    engine = _engine()
    engine.load_adapter("a", folders["a"])  # 4 rows
    bank = _q_proj(engine)
    assert bank.capacity == 4
    engine.load_adapter("c", folders["c"])  # 8 needed: 2 x 4
    assert bank.capacity == 8
    engine.load_adapter("b", folders["b"])  # 16 needed: 2 x 8
    assert bank.capacity == 16 and bank.used_rank == 16
    engine.unload_adapter("c")  # 4 of 16 free: kept
    assert bank.capacity == 16 and bank.layout == (("a", 0, 4), ("b", 8, 8))
    assert bank.A is not None
    pointer = bank.A.data_ptr()
    engine.load_adapter("c", folders["c"])  # back into its freed rows
    assert bank.A.data_ptr() == pointer and bank.layout[1] == ("c", 4, 4)


def test_unload_zeroes_freed_rows_a_load_reuses_them_and_outputs_stay_exact(
    folders: dict[str, Path],
) -> None:
    engine = _engine(reserve_rank=24)
    for name in ("a", "b", "c"):
        engine.load_adapter(name, folders[name])
    bank = _q_proj(engine)
    assert bank.A is not None and bank.B_t is not None
    pointer = bank.A.data_ptr()
    engine.unload_adapter("b")
    assert torch.count_nonzero(bank.A[4:12]) == 0 and torch.count_nonzero(bank.B_t[4:12]) == 0
    engine.load_adapter("d", folders["d"])  # rank 6 fits the 8 rows b freed
    assert bank.layout == (("a", 0, 4), ("d", 4, 6), ("c", 12, 4))
    assert bank.A.data_ptr() == pointer and bank.capacity == 24
    specs = [None, "a", "d", "c", {"a": 0.5, "d": -0.7}]
    prompts = [[104, 101, 108, 108, 111][: 2 + i] for i in range(len(specs))]
    logits = engine.prompt_logits(prompts, specs)
    for spec, prompt, got in zip(specs, prompts, logits, strict=True):
        reference = _merged_reference(folders, spec)
        with torch.no_grad():
            expected = reference(torch.tensor([prompt])).logits[0]
        assert (got - expected).abs().max() < FP32_LOGITS_ATOL, spec


def test_unloads_shrink_stacks_whose_free_rows_outnumber_the_loaded_ones(
    folders: dict[str, Path],
) -> None:
    engine = _engine()
    engine.load_adapter("b", folders["b"])
    engine.load_adapter("a", folders["a"])  # 12 needed, 2 x 8 = 16
    bank = _q_proj(engine)
    rows_a = _rows(bank, "a")
    assert bank.capacity == 16
    engine.unload_adapter("b")  # 12 free > 4 owned: packed into 4 rows
    assert bank.capacity == 4 and bank.layout == (("a", 0, 4),)
    assert all(torch.equal(x, y) for x, y in zip(_rows(bank, "a"), rows_a, strict=True))
    engine.unload_adapter("a")
    assert bank.A is None and bank.B_t is None and engine._banks.factor_bytes() == (0, 0)
    reserved = _engine(reserve_rank=16)
    reserved.load_adapter("a", folders["a"])
    reserved.unload_adapter("a")  # the reserve stays
    assert _q_proj(reserved).capacity == 16


def test_free_rows_enough_but_scattered_are_packed_without_growing(
    folders: dict[str, Path],
) -> None:
    engine = _engine(reserve_rank=20)
    for name in ("a", "b", "c"):
        engine.load_adapter(name, folders[name])
    engine.unload_adapter("a")  # free: rows 0-4 and 16-20
    bank = _q_proj(engine)
    rows = {name: _rows(bank, name) for name in ("b", "c")}
    engine.load_adapter("d", folders["d"])  # rank 6: no free run fits, 8 free rows in all
    assert bank.capacity == 20 and bank.layout == (("b", 0, 8), ("c", 8, 4), ("d", 12, 6))
    for name, (A, B_t) in rows.items():
        got_A, got_B_t = _rows(bank, name)
        assert torch.equal(got_A, A) and torch.equal(got_B_t, B_t)


def test_a_negative_reserve_is_refused_with_the_fix() -> None:
    with pytest.raises(ServeError, match=r"reserve_rank=-1 is not allowed: it must be an int >= 0"):
        _engine(reserve_rank=-1)


def test_decoding_rows_of_same_rank_adapters_takes_the_grouped_route_and_stays_exact(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def counting(*args: torch.Tensor | None) -> None:
        assert args[0] is not None
        calls.append(args[0].shape[0])
        grouped_lora_add_(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(routing_module, "grouped_lora_add_", counting)
    engine = _engine()
    engine.load_adapter("a", folders["a"])
    engine.load_adapter("c", folders["c"])
    specs: list[AdapterSpec] = ["a", "c", None, {"c": 0.5}, "a"]
    prompt = [104, 101, 108, 108, 111]
    handles = [
        engine.submit(prompt[: 3 + i % 3], spec, SamplingParams(max_tokens=6))
        for i, spec in enumerate(specs)
    ]
    engine._run_inline(handles)
    # q_proj and v_proj of 2 layers, 5 decoding steps (the scheduler orders the rows by
    # adapter, base row last, so the op sees the 4 adapter rows in place).
    assert len(calls) >= 4 * 5 and set(calls) <= {4, 5}
    prompts = [prompt[: 3 + i % 3] for i in range(len(specs))]
    _assert_greedy_equals_merged(folders, specs, prompts, handles, 6)


def test_rows_already_grouped_by_adapter_skip_the_regrouping_and_stay_exact(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    in_order: list[bool] = []
    lengths: set[int] = set()

    def recording(*args: torch.Tensor | None) -> None:
        in_order.append(args[4] is None and args[5] is None)  # sources, weights
        assert args[1] is not None
        lengths.add(args[1].shape[1])  # x (rows, seq, in)
        grouped_lora_add_(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(routing_module, "grouped_lora_add_", recording)
    engine = _engine()
    engine.load_adapter("a", folders["a"])
    engine.load_adapter("c", folders["c"])
    specs: list[AdapterSpec] = ["a", "a", "c", "c"]  # two rows per adapter, in stack order
    prompt = [104, 101, 108, 108, 111]
    handles = [engine.submit(prompt, spec, SamplingParams(max_tokens=5)) for spec in specs]
    engine._run_inline(handles)
    assert in_order and all(in_order)
    assert lengths == {1, len(prompt)}  # the prefill (rows in order) took the route too
    _assert_greedy_equals_merged(folders, specs, [prompt] * len(specs), handles, 5)


def test_running_rows_stay_grouped_by_adapter_in_stack_order_with_base_rows_last(
    folders: dict[str, Path],
) -> None:
    engine = _engine(reserve_rank=32)
    for name in ("c", "a", "d"):  # stack order c, a, d (not the names' order)
        engine.load_adapter(name, folders[name])
    prompt = [104, 101, 108, 108, 111]
    sampling = SamplingParams(max_tokens=8)
    first: list[AdapterSpec] = ["a", None, "d", "c", "a"]
    handles = [engine.submit(prompt, spec, sampling) for spec in first]
    engine._run_steps(2)
    order = [s.choice for s in engine._scheduler.running]
    assert [c[0][0] if c else None for c in order] == ["c", "a", "a", "d", None]
    # A hot load while rows run, then joins that interleave adapters and base rows again.
    engine.load_adapter("b", folders["b"])  # stack order c, a, d, b
    joined: list[AdapterSpec] = ["b", None, "d"]
    handles += [engine.submit(prompt[:3], spec, sampling) for spec in joined]
    engine._run_steps(1)
    names = [c[0][0] if c else None for c in (s.choice for s in engine._scheduler.running)]
    assert engine._banks.stack_order() == ["c", "a", "d", "b"]
    assert names == ["c", "a", "a", "d", "d", "b", None, None]
    engine._run_inline(handles)
    specs = first + joined
    prompts = [prompt] * len(first) + [prompt[:3]] * len(joined)
    _assert_greedy_equals_merged(folders, specs, prompts, handles, 8)


def test_rows_of_one_adapter_with_different_weights_sit_together_by_weight(
    folders: dict[str, Path],
) -> None:
    engine = _engine()
    engine.load_adapter("a", folders["a"])
    specs: list[AdapterSpec] = [{"a": 0.5}, "a", {"a": 0.5}, "a"]
    prompt = [104, 101, 108, 108, 111]
    handles = [engine.submit(prompt, spec, SamplingParams(max_tokens=4)) for spec in specs]
    engine._run_steps(1)
    choices = [s.choice for s in engine._scheduler.running]
    assert choices == [(("a", 0.5),), (("a", 0.5),), (("a", 1.0),), (("a", 1.0),)]
    engine._run_inline(handles)
    _assert_greedy_equals_merged(folders, specs, [prompt] * len(specs), handles, 4)


def test_sliced_lora_add_adds_each_slices_update_in_place_float64() -> None:
    generator = torch.Generator().manual_seed(0)
    rows, seq, in_features, out_features = 5, 3, 6, 4
    x = torch.randn(rows, seq, in_features, generator=generator, dtype=torch.float64)
    A = torch.randn(7, in_features, generator=generator, dtype=torch.float64)  # ranks 3 and 4
    B_t = torch.randn(7, out_features, generator=generator, dtype=torch.float64)
    y0 = torch.randn(rows, seq, out_features, generator=generator, dtype=torch.float64)
    y = y0.clone()
    storage = y.data_ptr()
    # Rows 0-1: adapter 1 (rows 0-2 of the stacks); row 2: base; row 3: a blend of both
    # adapters; row 4: adapter 2 (rows 3-6) with weight -0.5.
    slices = [(0, 2, 0, 3, 1.0), (3, 4, 0, 3, 0.7), (3, 4, 3, 4, 0.25), (4, 5, 3, 4, -0.5)]
    sliced_lora_add_(y, x, A, B_t, slices)
    assert y.data_ptr() == storage  # in place
    one, two = (A[:3], B_t[:3]), (A[3:], B_t[3:])
    terms = [[(1.0, one)], [(1.0, one)], [], [(0.7, one), (0.25, two)], [(-0.5, two)]]
    for row, row_terms in enumerate(terms):
        expected = y0[row].clone()
        for weight, (A_i, B_t_i) in row_terms:
            expected += weight * (x[row] @ A_i.t() @ B_t_i)
        if not row_terms:
            assert torch.equal(y[row], y0[row])  # base rows are not touched
        assert torch.allclose(y[row], expected, atol=1e-10, rtol=0)


def test_prefill_orders_rows_by_adapter_so_each_adapter_is_one_slice(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    slice_counts: list[int] = []

    def counting(
        y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B_t: torch.Tensor, slices: list[Slice]
    ) -> None:
        slice_counts.append(len(slices))
        sliced_lora_add_(y, x, A, B_t, slices)

    monkeypatch.setattr(routing_module, "sliced_lora_add_", counting)
    engine = _engine()
    engine.load_adapter("a", folders["a"])
    engine.load_adapter("c", folders["c"])
    specs: list[AdapterSpec] = ["a", "c", None, "a", "c", "a"]
    prompt = [104, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]
    handles = [engine.submit(prompt, spec, SamplingParams(max_tokens=1)) for spec in specs]
    engine._run_inline(handles)
    # One prefill of 6 rows of 11 tokens: in submission order the rows would make 5 slices
    # per layer; ordered by adapter, "a" and "c" are one slice each.
    assert slice_counts == [2] * 4  # q_proj and v_proj of 2 layers
    _assert_greedy_equals_merged(folders, specs, [prompt] * len(specs), handles, 1)


def test_a_load_writes_the_files_factors_exactly_read_in_place(
    folders: dict[str, Path],
) -> None:
    from safetensors.torch import load_file

    engine = _engine()
    engine.load_adapter("b", folders["b"])
    tensors = load_file(folders["b"] / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    A, B = tensors[key.format("A")], tensors[key.format("B")]
    got_A, got_B_t = _rows(_q_proj(engine), "b")
    assert torch.equal(got_A, A)
    assert torch.equal(got_B_t, B.t() * (8 / 8))  # lora_alpha 8, r 8: s = 1


def test_a_corrupt_weights_file_is_refused_by_lorakit_io_with_the_fix(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    engine = _engine()
    for name, cut in (("cut_200", 200), ("cut_12", 12)):  # bytes cut from the end
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_bytes(
            (folders["a"] / "adapter_config.json").read_bytes()
        )
        data = (folders["a"] / "adapter_model.safetensors").read_bytes()
        (folder / "adapter_model.safetensors").write_bytes(data[:-cut])
        with pytest.raises(CorruptAdapterFileError, match="not a readable safetensors file"):
            engine.load_adapter(name, folder)
    assert engine.adapters() == {}
