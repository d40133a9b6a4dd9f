"""Blockwise 4-bit quantization: hand-computed bounds, bitsandbytes as the byte-level oracle."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bnb_support import import_bitsandbytes
from lorakit.ops import nf4

bnb_functional, BNB_MISSING = import_bitsandbytes("bitsandbytes.functional")

needs_bnb = pytest.mark.skipif(bnb_functional is None, reason=BNB_MISSING)

# fp32 rounding of w / absmax and of code · absmax: a few ulps of the block's absmax.
ROUNDING_SLACK = 1e-6
# fp32 sums over up to 256 inputs (in another order than the float64 reference), with weights of
# a trained layer's size (std 0.05) and unit inputs, so that outputs are of order 1.
FP32_MATMUL_TOLERANCE = 1e-5
WEIGHT_STD = 0.05


def step_bound(quant_type: nf4.QuantType) -> float:
    """Half the largest gap between adjacent code values: the worst rounding of a w / absmax."""
    code = sorted(nf4.code_book(quant_type).double().tolist())
    return max(b - a for a, b in itertools.pairwise(code)) / 2


def blockwise(values: torch.Tensor, blocksize: int) -> torch.Tensor:
    flat = values.reshape(-1).double()
    pad = -flat.numel() % blocksize
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.sampled_from([(64, 64), (3, 100), (7,), (2, 3, 65), (130, 32)]),
    quant_type=st.sampled_from(nf4.QUANT_TYPES),
    blocksize=st.sampled_from([32, 64, 128]),
    double_quant=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 50.0]),
    seed=st.integers(0, 2**16),
)
def test_error_per_block_within_the_step_bound(
    shape: tuple[int, ...],
    quant_type: nf4.QuantType,
    blocksize: int,
    double_quant: bool,
    scale: float,
    seed: int,
) -> None:
    W = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    q = nf4.quantize_4bit(W, quant_type, blocksize, double_quant)
    restored = nf4.dequantize_4bit(q)
    assert restored.shape == W.shape and restored.dtype == W.dtype
    blocks = blockwise(W, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # Double quantization perturbs each scale by at most half a step of the 8-bit map.
    scales = nf4.block_scales(q).double()
    assert torch.all((scales - absmax).abs() <= 0.01 * absmax.max() + ROUNDING_SLACK * scale)
    error = (blocks - blockwise(restored, blocksize)).abs().amax(dim=1)
    # |w - code·s| <= |w - code·a| + |code|·|a - s| with |code| <= 1.
    bound = step_bound(quant_type) * absmax + (scales - absmax).abs() + ROUNDING_SLACK * absmax
    assert torch.all(error <= bound)


def test_codes_are_the_nearest_code_values() -> None:
    W = torch.randn(8, 256, generator=torch.Generator().manual_seed(3))
    for quant_type in nf4.QUANT_TYPES:
        q = nf4.quantize_4bit(W, quant_type, blocksize=64)
        codes = torch.stack([q.packed >> 4, q.packed & 15], dim=1).view(-1).long()
        code = nf4.code_book(quant_type).double()
        blocks = blockwise(W, 64)
        unit = (blocks / blocks.abs().amax(dim=1, keepdim=True)).view(-1)
        chosen = (unit - code[codes]).abs()
        best = (unit[:, None] - code[None, :]).abs().amin(dim=1)
        assert torch.all(chosen <= best + 1e-7)


def test_packing_puts_the_first_value_in_the_high_nibble() -> None:
    W = torch.zeros(64)
    W[0], W[1], W[2], W[3] = 2.0, -2.0, 1.0, 0.0  # unit values 1, -1, 0.5, 0
    q = nf4.quantize_4bit(W, "nf4", blocksize=64)
    half = min(range(16), key=lambda c: abs(nf4.NF4_CODE[c] - 0.5))
    assert q.packed[0].item() == (15 << 4) | 0
    assert q.packed[1].item() == (half << 4) | 7
    assert q.absmax.tolist() == [2.0]
    assert q.packed.numel() == 32


def test_odd_sizes_pack_a_zero_pad_nibble_and_a_partial_block() -> None:
    W = torch.tensor([1.0, -3.0, 0.5])
    q = nf4.quantize_4bit(W, "nf4", blocksize=32)
    assert q.packed.numel() == 2 and q.absmax.tolist() == [3.0]
    assert (q.packed[1] & 15).item() == 7  # the pad nibble is code 7 (0.0)
    expected = torch.tensor([nf4.NF4_CODE[11], -1.0, nf4.NF4_CODE[9]]) * 3.0  # 1/3, 1/6
    torch.testing.assert_close(nf4.dequantize_4bit(q), expected, rtol=0, atol=1e-6)


def test_all_zero_block_dequantizes_to_zero() -> None:
    W = torch.zeros(2, 64)
    W[1] = torch.linspace(-1, 1, 64)
    for quant_type in nf4.QUANT_TYPES:
        for double_quant in (False, True):
            q = nf4.quantize_4bit(W, quant_type, 64, double_quant)
            restored = nf4.dequantize_4bit(q)
            assert torch.equal(restored[0], torch.zeros(64))


def test_dequantize_rounds_products_formed_in_fp32() -> None:
    W = torch.randn(16, 128, generator=torch.Generator().manual_seed(5))
    q = nf4.quantize_4bit(W, "nf4", 64, double_quant=True)
    reference = nf4.dequantize_4bit(q, torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(nf4.dequantize_4bit(q, dtype), reference.to(dtype))


def test_dequantize_in_pieces_equals_code_times_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nf4, "DECODE_ELEMENTS", 3 * 64)  # pieces of 3 blocks, the last of 1
    W = torch.randn(10 * 64 + 20, generator=torch.Generator().manual_seed(14))  # + a partial
    q = nf4.quantize_4bit(W, "nf4", 64, double_quant=True)
    codes = torch.stack([q.packed >> 4, q.packed & 15], dim=1).view(-1)[: W.numel()].long()
    scales = nf4.block_scales(q).repeat_interleave(64)[: W.numel()]
    expected = nf4.code_book("nf4")[codes] * scales  # fp32 products, as bitsandbytes forms them
    assert torch.equal(nf4.dequantize_4bit(q), expected)


def test_double_quant_storage_per_parameter() -> None:
    W = torch.randn(256, 256)
    single = nf4.quantize_4bit(W, "nf4", 64, double_quant=False)
    double = nf4.quantize_4bit(W, "nf4", 64, double_quant=True)
    n = W.numel()
    assert single.storage_bytes() == n // 2 + 4 * n // 64
    # codes + 1 byte per scale + one fp32 per 256 scales + the fp32 offset
    assert double.storage_bytes() == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    assert double.storage_bytes() / n <= 0.52


def test_8bit_blockwise_round_trip_within_half_a_map_step() -> None:
    values = torch.randn(1000, generator=torch.Generator().manual_seed(2)).abs()
    codes, absmax = nf4.quantize_blockwise_8bit(values)
    restored = nf4.dequantize_blockwise_8bit(codes, absmax)
    code = nf4.dynamic_map().double()
    largest_gap = (code[1:] - code[:-1]).max().item()
    lut_step = 2 / 65535  # values are rounded to a 65536-point grid of [-1, 1] first
    blocks = blockwise(values, 256)
    error = (blocks - blockwise(restored, 256)).abs().amax(dim=1)
    assert torch.all(error <= (largest_gap / 2 + lut_step) * absmax.double() + 1e-6)


def test_dynamic_map_shape() -> None:
    code = nf4.dynamic_map()
    assert code.numel() == 256 and torch.all(code[1:] > code[:-1])
    assert code[-1].item() == 1.0 and 0.0 in code.tolist()
    assert code[0].item() == pytest.approx(-0.99296875)


@pytest.mark.parametrize(
    ("quant_type", "blocksize", "message"),
    [("int4", 64, "quant_type='int4'"), ("nf4", 100, "blocksize=100")],
)
def test_bad_options_are_rejected(quant_type: str, blocksize: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        nf4.quantize_4bit(torch.randn(64), quant_type, blocksize)  # type: ignore[arg-type]


def test_bad_tensors_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"Cannot quantize a torch.int64 tensor"):
        nf4.quantize_4bit(torch.arange(64))
    with pytest.raises(ValueError, match=r"empty tensor of shape \(0, 4\)"):
        nf4.quantize_4bit(torch.zeros(0, 4))
    q = nf4.quantize_4bit(torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"got x of shape \(2, 32\)"):
        nf4.linear_4bit(torch.randn(2, 32), q)


# --- bitsandbytes as the oracle ----------------------------------------------------------------


@needs_bnb
def test_code_tables_equal_bitsandbytes() -> None:
    assert bnb_functional is not None
    assert torch.equal(nf4.dynamic_map(), bnb_functional.create_dynamic_map())
    for quant_type in nf4.QUANT_TYPES:
        ours = nf4.code_book(quant_type)
        theirs = bnb_functional.get_4bit_type(quant_type, device="cpu")
        assert torch.equal(ours, theirs) and torch.equal(ours.signbit(), theirs.signbit())


@needs_bnb
@pytest.mark.parametrize("quant_type", nf4.QUANT_TYPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_codes_scales_and_dequantized_values_equal_bitsandbytes(
    quant_type: nf4.QuantType, double_quant: bool, dtype: torch.dtype
) -> None:
    assert bnb_functional is not None
    generator = torch.Generator().manual_seed(11)
    for shape, blocksize in [((96, 256), 64), ((40, 512), 128), ((3000,), 32)]:
        W = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
        W.view(-1)[:blocksize] = 0  # an all-zero block
        packed, state = bnb_functional.quantize_4bit(
            W, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
        )
        q = nf4.quantize_4bit(W, quant_type, blocksize, double_quant)
        assert torch.equal(q.packed, packed.view(-1))
        assert torch.equal(q.absmax, state.absmax)
        if double_quant:
            assert torch.equal(q.nested_absmax, state.state2.absmax)
            assert torch.equal(q.offset, state.offset)
        ours = nf4.dequantize_4bit(q)
        assert ours.shape == W.shape  # bitsandbytes returns 1-D weights as (1, n)
        theirs = bnb_functional.dequantize_4bit(packed, state)
        assert torch.equal(ours.reshape(-1), theirs.reshape(-1))


@needs_bnb
def test_partial_blocks_equal_bitsandbytes() -> None:
    assert bnb_functional is not None
    W = torch.randn(7, 45, generator=torch.Generator().manual_seed(4))
    packed, state = bnb_functional.quantize_4bit(W, blocksize=64, quant_type="nf4")
    q = nf4.quantize_4bit(W, "nf4", 64)
    assert torch.equal(q.packed, packed.view(-1)) and torch.equal(q.absmax, state.absmax)


@needs_bnb
def test_8bit_blockwise_equals_bitsandbytes() -> None:
    assert bnb_functional is not None
    generator = torch.Generator().manual_seed(9)
    for values in (torch.randn(70000, generator=generator), torch.rand(300, generator=generator)):
        codes, state = bnb_functional.quantize_blockwise(values, blocksize=256)
        ours, absmax = nf4.quantize_blockwise_8bit(values)
        assert torch.equal(ours, codes) and torch.equal(absmax, state.absmax)


# --- linear_4bit ---------------------------------------------------------------------------------


def reference_linear(x: torch.Tensor, q: nf4.Quantized4bit, bias: torch.Tensor | None):
    weight = nf4.dequantize_4bit(q, torch.float32).double()
    result = x.double() @ weight.T
    return result if bias is None else result + bias.double()


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("tokens", [1, 5, 70])
def test_linear_4bit_equals_dense_matmul(double_quant: bool, tokens: int) -> None:
    generator = torch.Generator().manual_seed(tokens)
    W = torch.randn(48, 256, generator=generator) * WEIGHT_STD
    q = nf4.quantize_4bit(W, "nf4", 64, double_quant)
    x = torch.randn(2, tokens, 256, generator=generator)
    bias = torch.randn(48, generator=generator)
    result = nf4.linear_4bit(x, q, bias)
    assert result.shape == (2, tokens, 48)
    expected = reference_linear(x.reshape(-1, 256), q, bias).view(2, tokens, 48)
    torch.testing.assert_close(result.double(), expected, rtol=0, atol=FP32_MATMUL_TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [3, 70])
def test_tiled_path_equals_the_one_shot_path(
    monkeypatch: pytest.MonkeyPatch, tokens: int, dtype: torch.dtype
) -> None:
    generator = torch.Generator().manual_seed(8)
    q = nf4.quantize_4bit(torch.randn(37, 128, generator=generator) * WEIGHT_STD, "fp4", 32, True)
    x = torch.randn(tokens, 128, generator=generator).to(dtype)
    one_shot = nf4.linear_4bit(x, q)
    # Pieces of 5 weight rows (the last of 2); with many tokens, of 15 rows (the last of 7).
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # decode pieces scale with threads
    monkeypatch.setattr(nf4, "DECODE_ELEMENTS", 5 * 128)
    monkeypatch.setattr(nf4, "MATMUL_ELEMENTS_PER_TOKEN", 128)
    monkeypatch.setattr(nf4, "MATMUL_ELEMENTS_MAX", 15 * 128)
    assert nf4._rows_per_piece(q, tokens, x.device) == (15 if tokens == 70 else 5)
    tiled = nf4.linear_4bit(x, q)
    # Same weights, same sums; only the BLAS kernel may differ with the matrix widths.
    torch.testing.assert_close(tiled, one_shot, rtol=1e-6, atol=1e-6)
    expected = x.double() @ nf4.dequantize_4bit(q, dtype).double().T
    tolerance = FP32_MATMUL_TOLERANCE if dtype == torch.float32 else 2.0**-7
    torch.testing.assert_close(tiled.double(), expected, rtol=tolerance, atol=tolerance)


def test_unaligned_rows_fall_back_to_the_dense_weight() -> None:
    generator = torch.Generator().manual_seed(6)
    q = nf4.quantize_4bit(torch.randn(5, 100, generator=generator) * WEIGHT_STD, "nf4", 64)
    x = torch.randn(4, 100, generator=generator)
    expected = reference_linear(x, q, None)
    torch.testing.assert_close(
        nf4.linear_4bit(x, q).double(), expected, rtol=0, atol=FP32_MATMUL_TOLERANCE
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_4bit_in_half_precision(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(12)
    q = nf4.quantize_4bit(torch.randn(64, 128, generator=generator), "nf4", 64, True)
    x = torch.randn(9, 128, generator=generator).to(dtype)
    result = nf4.linear_4bit(x, q)
    assert result.dtype == dtype
    weight = nf4.dequantize_4bit(q, dtype)
    expected = x.double() @ weight.double().T  # the same rounded weights, exact sums
    # Half-precision outputs carry a relative rounding of 2^-8 (bf16) / 2^-11 (fp16).
    tolerance = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    torch.testing.assert_close(result.double(), expected, rtol=tolerance, atol=tolerance)


def test_backward_gives_the_dense_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(nf4, "DECODE_ELEMENTS", 8 * 128)  # pieces of 8 weight rows
    generator = torch.Generator().manual_seed(13)
    q = nf4.quantize_4bit(torch.randn(40, 128, generator=generator) * WEIGHT_STD, "nf4", 64, True)
    x = torch.randn(6, 128, generator=generator, requires_grad=True)
    bias = torch.randn(40, generator=generator, requires_grad=True)
    upstream = torch.randn(6, 40, generator=generator)
    (nf4.linear_4bit(x, q, bias) * upstream).sum().backward()
    weight = nf4.dequantize_4bit(q).double()
    assert x.grad is not None and bias.grad is not None
    torch.testing.assert_close(
        x.grad.double(), upstream.double() @ weight, rtol=0, atol=FP32_MATMUL_TOLERANCE
    )
    torch.testing.assert_close(bias.grad, upstream.sum(dim=0), rtol=0, atol=1e-6)


def test_threads_decoding_at_once_do_not_share_buffers() -> None:
    """Each thread decodes into buffers of its own (the CPU path reuses them across calls)."""
    from concurrent.futures import ThreadPoolExecutor

    generator = torch.Generator().manual_seed(5)
    cases = []
    for _ in range(2):
        q = nf4.quantize_4bit(torch.randn(96, 128, generator=generator), blocksize=64)
        x = torch.randn(7, 128, generator=generator)
        cases.append((x, q, x @ nf4.dequantize_4bit(q).t()))

    def run(case: tuple) -> bool:
        x, q, expected = case
        return all(torch.allclose(nf4.linear_4bit(x, q), expected, atol=1e-5) for _ in range(50))

    with ThreadPoolExecutor(max_workers=2) as pool:
        assert all(pool.map(run, cases * 4))
