"""The native few-row CPU kernels (kernels/fewrow.cpp): GGUF block decoding, accuracy against torch, and row
invariance (a row's result bit-identical whatever else shares the call, and whatever the thread count), on every
instruction-set path this CPU has. Nothing here depends on the host's CPU, thread count or speed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from layerskip.model.kernels import native
from layerskip.model.kernels.linear import block_panels, float_panels, unpanel, unpanel_blocks

BLOCK_FORMATS = ("q8_0", "q4_0", "q4_1")
FORMATS = ("f32", "bf16", *BLOCK_FORMATS)


@pytest.fixture(scope="module")
def ext():
    module = native.load_native()
    if module is None:
        pytest.skip("the native kernels are not available here (see the warning)")
    return module


@contextlib.contextmanager
def isa_path(ext, name: str) -> Iterator[None]:
    previous = ext.isa()
    ext.set_isa(name)
    try:
        yield
    finally:
        ext.set_isa(previous)


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def every_isa(ext) -> Iterator[str]:
    for name in ext.available_isas():
        with isa_path(ext, name):
            yield name


def quantize_blocks(w: torch.Tensor, fmt: str) -> torch.Tensor:
    import gguf

    kind = gguf.GGMLQuantizationType[fmt.upper()]
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(w.numpy(), kind)))


def dequantize_blocks(blocks: torch.Tensor, fmt: str) -> torch.Tensor:
    import gguf

    kind = gguf.GGMLQuantizationType[fmt.upper()]
    return torch.from_numpy(np.array(gguf.quants.dequantize(blocks.numpy(), kind), dtype=np.float32))


def weights(fmt: str, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the kernel takes, the float32 weights it multiplies by)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    if fmt == "f32":
        return float_panels(w, torch.float32), w
    if fmt == "bf16":
        return float_panels(w, torch.bfloat16), w.bfloat16().float()
    blocks = quantize_blocks(w, fmt)
    return block_panels(blocks, fmt), dequantize_blocks(blocks, fmt).reshape(n, k)


def kernel(ext, fmt: str, out_features: int):
    """y = x W^T through the extension (panels hold up to 15 padding features: the kernels take the true count)."""
    run = getattr(ext, f"linear_{fmt}")
    return lambda x, w: run(x, w, out_features)


def quantized_activation(x: torch.Tensor) -> torch.Tensor:
    """The activation the block kernels multiply by, computed here independently of them: per row and block of
    32, scale = max|x| / 127 and q = round-half-even(x / scale), in float32; returned dequantized in float64."""
    blocks = x.reshape(x.shape[0], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.where(scale > 0, torch.round(blocks / scale), torch.zeros_like(blocks)).clamp(-127, 127)
    return (q.double() * scale.double()).reshape(x.shape)


def assert_close_to(y: torch.Tensor, reference: torch.Tensor, rel: float) -> None:
    error = (y.double() - reference).abs().max().item()
    assert error <= rel * reference.abs().max().item(), f"max error {error:.3g} vs scale {reference.abs().max():.3g}"


def test_isa_paths(ext):
    assert ext.isa() in ext.available_isas()
    assert "scalar" in ext.available_isas()
    with pytest.raises(RuntimeError, match="unknown"):
        ext.set_isa("sse9")


def taken_activation(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """The activation a float kernel multiplies by: x itself for float32 weights, x rounded to bfloat16 (to
    nearest even) for bfloat16 weights, as float64."""
    return (x.bfloat16() if fmt == "bf16" else x).double()


@pytest.mark.parametrize("fmt", ["f32", "bf16"])
def test_float_weights_match_linear(ext, fmt):
    for k in (64, 100, 37):  # an odd K: bfloat16's last pair of k holds one weight
        packed, w = weights(fmt, 19, k)
        for rows in (1, 3, 9):
            x = torch.randn(rows, k)
            reference = taken_activation(x, fmt) @ w.double().T
            plain = x.double() @ w.double().T
            for _ in every_isa(ext):
                y = kernel(ext, fmt, 19)(x, packed)
                assert y.shape == (rows, 19) and y.dtype == torch.float32
                assert_close_to(y, reference, 1e-5)
                assert_close_to(y, plain, 1e-2)  # what rounding bfloat16 activations costs: well under 1% here


def test_float_panels_hold_the_matrix():
    w = torch.randn(37, 5)
    panels = float_panels(w, torch.float32)
    assert panels.shape == (3, 5, 16)
    assert torch.equal(panels[1, 2], w[16:32, 2]) and torch.equal(panels[2, :, 5:], torch.zeros(5, 11))
    assert torch.equal(unpanel(panels, 37, 5), w)
    halves = float_panels(w, torch.bfloat16)  # k pairs interleaved, K padded to 6 with zeros
    assert halves.shape == (3, 3, 32)
    assert torch.equal(halves[1, 1, 0::2], w[16:32, 2].bfloat16()) and torch.equal(halves[1, 1, 1::2], w[16:32, 3].bfloat16())
    assert torch.equal(halves[0, 2, 1::2], torch.zeros(16, dtype=torch.bfloat16))
    assert torch.equal(unpanel(halves, 37, 5), w.bfloat16())


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_block_panels_move_the_blocks_bytes_only(fmt):
    blocks = quantize_blocks(torch.randn(21, 96), fmt)
    panels = block_panels(blocks, fmt)
    size, heads = {"q8_0": (34, 2), "q4_0": (18, 2), "q4_1": (20, 4)}[fmt]
    assert panels.shape == (2, 3 * 16 * size)
    block = panels[1].view(3, 16 * size)[2]  # panel 1 (features 16..31), block 2
    assert torch.equal(block[:32].view(16, 2)[3], blocks[19, 2 * size:2 * size + 2])  # feature 19's scale
    data = block[16 * heads:].view(-1, 16, 4)  # [vector j, feature, byte t] = the block's data byte 4 j + t
    flip = 0x80 if fmt == "q8_0" else 0  # Q8_0's weights are stored + 128
    assert torch.equal(data[:, 3].reshape(-1) ^ flip, blocks[19, 2 * size + heads:3 * size])
    assert torch.equal(data[:, 5:] ^ flip, torch.zeros(data.shape[0], 11, 4, dtype=torch.uint8))  # padding
    assert torch.equal(unpanel_blocks(panels, fmt, 21), blocks)


def fma32(a: float, b: float, c: float) -> np.float32:
    """float32 fma: a * b + c computed exactly, rounded once to the nearest float32 (ties to even)."""
    exact = Fraction(a) * Fraction(b) + Fraction(c)
    near = np.float32(float(exact))  # within one float32 step of the answer: pick the nearest of it and its neighbours
    candidates = [np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.float32(np.inf))]
    return min(candidates, key=lambda v: (abs(Fraction(float(v)) - exact), int(v.view(np.uint32)) & 1))


@pytest.mark.parametrize("fmt", ["f32", "bf16"])
def test_float_products_are_exact_multiply_add_chains(ext, fmt):
    """Each output is one chain of float32 fused multiply-adds from zero (fewrow.cpp: PanelRun), bit for bit on
    every vector path: over k in order for float32; for bfloat16, x rounded to bfloat16 and each pair of k taken
    k + 1 first, the order of vdpbf16ps (whose products are exact, so the scalar path's separate multiply and
    add agree too)."""
    n, k, rows = 18, 25, 3  # an odd K: bfloat16's last pair is padded with a zero weight
    packed, w = weights(fmt, n, k, seed=3)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(4))
    taken = taken_activation(x, fmt).float()
    order = list(range(k)) if fmt == "f32" else [i for pair in range(0, k, 2) for i in (pair + 1, pair) if i < k]
    expected = np.zeros((rows, n), np.float32)
    for r in range(rows):
        for j in range(n):
            for i in order:
                expected[r, j] = fma32(float(taken[r, i]), float(w[j, i]), float(expected[r, j]))
    for name in ext.available_isas():
        if name != "scalar" or fmt == "bf16":  # the scalar path assumes no FMA hardware: a rounded product, a sum
            with isa_path(ext, name):
                assert torch.equal(kernel(ext, fmt, n)(x, packed), torch.from_numpy(expected)), name


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_block_weights_match_linear(ext, fmt):
    for k in (96, 320):  # 3 blocks (steps only), 10 blocks (a unit of 8 and steps on the vector paths)
        blocks, w = weights(fmt, 23, k)
        for rows in (1, 5, 11):
            x = torch.randn(rows, k)
            reference = quantized_activation(x) @ w.double().T
            plain = x.double() @ w.double().T
            for _ in every_isa(ext):
                y = kernel(ext, fmt, 23)(x, blocks)
                assert_close_to(y, reference, 1e-5)
                # What quantizing the activation to 8 bits costs against plain F.linear: well under 2% here.
                assert_close_to(y, plain, 2e-2)


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_block_mapping_is_exact(ext, fmt):
    """One-hot rows read single weights back: x = c * e_k with c = 127 * 2^-4 quantizes exactly (scale 2^-4,
    q = 127), so row k of the result is 127 * 2^-4 * column k of gguf's dequantization, rounded once to float32;
    exactly that for Q8_0 and Q4_0, within one rounding for Q4_1 (its min is a second product)."""
    k, n = 288, 40  # 9 blocks: the vector paths run a unit of 8 blocks, then a step over the last one
    blocks, w = weights(fmt, n, k, seed=1)
    x = torch.eye(k) * (127 * 2.0**-4)
    expected = (w.T * 127) * 2.0**-4  # float32: one rounding of 127 * w, then an exact power of two
    for _ in every_isa(ext):
        y = kernel(ext, fmt, n)(x, blocks)
        if fmt == "q4_1":
            torch.testing.assert_close(y, expected, rtol=3e-7, atol=1e-7)
        else:
            assert torch.equal(y, expected)


def invariance_case(fmt: str) -> tuple[int, int]:
    """(N, K) large enough that two threads split the features (each task takes >= 64 KiB of weights)."""
    return {"f32": (300, 100), "bf16": (600, 100), "q8_0": (400, 320), "q4_0": (800, 320), "q4_1": (800, 320)}[fmt]


@pytest.mark.parametrize("fmt", FORMATS)
def test_linear_rows_are_invariant(ext, fmt):
    n, k = invariance_case(fmt)
    packed, _ = weights(fmt, n, k)
    generator = torch.Generator().manual_seed(2)
    rows = torch.randn(40, k, generator=generator)  # several groups of rows: the blocked order (fewrow.cpp: drive)
    for _ in every_isa(ext):
        run = kernel(ext, fmt, n)
        alone = torch.cat([run(rows[i:i + 1], packed) for i in range(len(rows))])
        for count in (2, 3, 5, 8, 9, 16, 17, 25, 40):
            order = torch.randperm(len(rows), generator=generator)[:count]
            together = run(rows[order], packed)
            assert torch.equal(together, alone[order]), (count, order)
        with threads(1):
            one = run(rows, packed)
        with threads(2):
            two = run(rows, packed)
        assert torch.equal(one, alone) and torch.equal(two, alone)


@pytest.mark.parametrize("fmt", ["f32", "q8_0"])
def test_a_long_pass_across_several_weight_blocks_equals_its_rows_alone(ext, fmt):
    """Enough weight rows that each thread's share spans several of the L2 blocks a long pass walks (fewrow.cpp:
    drive, 256 KiB of weights a block): every feature once, each row as alone, close to the reference."""
    n, k = 2304, 256  # f32: 1 KiB a weight row, 256 rows a block, several blocks per thread
    packed, w = weights(fmt, n, k, seed=5)
    rows = torch.randn(24, k, generator=torch.Generator().manual_seed(6))
    for _ in every_isa(ext):
        run = kernel(ext, fmt, n)
        together = run(rows, packed)
        assert torch.equal(together, torch.cat([run(rows[i:i + 1], packed) for i in range(len(rows))]))
        if fmt == "f32":
            assert_close_to(together, rows.double() @ w.double().T, 1e-5)


def test_silu_gate_matches_torch_and_is_elementwise(ext):
    """The gated MLP's SiLU(gate) * up, against float64, with large, tiny and zero gates; a row alone equals the
    same row among others (elementwise), on every path."""
    generator = torch.Generator().manual_seed(7)
    gate_up = torch.randn(9, 2 * 37, generator=generator) * 6  # 37: a vector tail on every path
    gate_up[0, :4] = torch.tensor([100.0, -100.0, 0.0, 1e-30])
    reference = F.silu(gate_up[:, :37].double()) * gate_up[:, 37:].double()
    for _ in every_isa(ext):
        out = ext.silu_gate(gate_up)
        assert ((out.double() - reference).abs() <= 1e-6 * reference.abs() + 1e-37).all()
        assert torch.equal(torch.cat([ext.silu_gate(gate_up[i:i + 1]) for i in range(9)]), out)


def sdpa_reference(q, k, v, start_pos, attendable):
    """SDPA with the boolean mask the kernel means: causal, attendable keys, and always the query's own position."""
    batch, heads, length, _ = q.shape
    size = k.shape[2]
    group = heads // k.shape[1]
    query_pos = torch.arange(start_pos, start_pos + length)[:, None]
    key_pos = torch.arange(size)[None, :]
    mask = (key_pos <= query_pos)[None].expand(batch, length, size)
    if attendable is not None:
        mask = mask & attendable[:, None, :size]
    mask = mask | (key_pos == query_pos)[None]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                          attn_mask=mask[:, None])


def attention_case(length: int, dim: int, padded: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batch, heads, kv_heads, start_pos, capacity = 2, 4, 2, 5, 24
    q = torch.randn(batch, heads, length, dim, generator=generator)
    cache_k = torch.randn(batch, kv_heads, capacity, dim, generator=generator)
    cache_v = torch.randn(batch, kv_heads, capacity, dim, generator=generator)
    attendable = None
    if padded:  # left padding in batch row 0, a hole in row 1
        attendable = torch.ones(batch, capacity, dtype=torch.bool)
        attendable[0, :3] = False
        attendable[1, 6] = False
    return q, cache_k, cache_v, start_pos, attendable


@pytest.mark.parametrize("padded", [False, True])
def test_attention_matches_sdpa(ext, padded):
    for dim in (64, 40):
        for length in (1, 3, 8):
            q, cache_k, cache_v, start_pos, attendable = attention_case(length, dim, padded)
            end = start_pos + length
            k, v = cache_k[:, :, :end], cache_v[:, :, :end]  # views of the cache, as the model passes them
            reference = sdpa_reference(q, k, v, start_pos, attendable)
            for _ in every_isa(ext):
                out = ext.attention(q, k, v, start_pos, attendable)
                assert out.shape == q.shape and out.is_contiguous()
                torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_attention_queries_are_invariant(ext, padded):
    length = 6
    q, cache_k, cache_v, start_pos, attendable = attention_case(length, 64, padded, seed=3)
    end = start_pos + length
    for _ in every_isa(ext):
        together = ext.attention(q, cache_k[:, :, :end], cache_v[:, :, :end], start_pos, attendable)
        for t in range(length):
            position = start_pos + t
            alone = ext.attention(q[:, :, t:t + 1], cache_k[:, :, :position + 1], cache_v[:, :, :position + 1],
                                  position, attendable)
            assert torch.equal(alone, together[:, :, t:t + 1]), t
        with threads(1):
            one = ext.attention(q, cache_k[:, :, :end], cache_v[:, :, :end], start_pos, attendable)
        assert torch.equal(one, together)


def test_a_query_with_masked_keys_before_it_equals_the_query_with_those_keys_removed(ext):
    """Tree drafts: sibling candidates sit in the slots before a candidate, masked. Its attention must be bit-identical
    to the same query where the siblings never were (its key moved down to the first sibling's slot)."""
    q, cache_k, cache_v, start_pos, _ = attention_case(1, 64, False, seed=7)
    siblings, position = 3, start_pos + 3  # slots start_pos .. start_pos + 2 hold siblings
    attendable = torch.ones(2, 24, dtype=torch.bool)
    attendable[:, start_pos:start_pos + siblings] = False
    packed_k = torch.cat((cache_k[:, :, :start_pos], cache_k[:, :, position:position + 1]), 2)
    packed_v = torch.cat((cache_v[:, :, :start_pos], cache_v[:, :, position:position + 1]), 2)
    for _ in every_isa(ext):
        masked = ext.attention(q, cache_k[:, :, :position + 1], cache_v[:, :, :position + 1], position, attendable)
        alone = ext.attention(q, packed_k, packed_v, start_pos, None)
        assert torch.equal(masked, alone)


def test_per_row_start_positions_equal_each_row_alone(ext):
    """`starts`: batch row b's query t is at position starts[b] + t, attending keys up to it in its own row."""
    q, cache_k, cache_v, _, attendable = attention_case(3, 64, True, seed=5)
    starts = torch.tensor([2, 9])
    end = int(starts.max()) + 3
    for _ in every_isa(ext):
        together = ext.attention(q, cache_k[:, :, :end], cache_v[:, :, :end], 0, attendable, starts)
        swapped = ext.attention(q.flip(0), cache_k[:, :, :end], cache_v[:, :, :end], 0, attendable, starts.flip(0),
                                torch.tensor([1, 0]))  # batch row b reads cache row rows[b]
        assert torch.equal(swapped, together.flip(0))
        for row, start in enumerate(starts.tolist()):
            rows = slice(row, row + 1)
            alone = ext.attention(q[rows], cache_k[rows, :, :start + 3], cache_v[rows, :, :start + 3], start,
                                  attendable[rows])
            assert torch.equal(together[rows], alone)
            reference = sdpa_reference(q[rows], cache_k[rows, :, :start + 3], cache_v[rows, :, :start + 3], start,
                                       attendable[rows])
            torch.testing.assert_close(alone, reference, rtol=1e-5, atol=1e-5)


def test_disabled_without_building(monkeypatch):
    """LAYERSKIP_NATIVE=0: load_native() is None at once, without trying to build (today's torch path runs)."""
    monkeypatch.setenv("LAYERSKIP_NATIVE", "0")
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_tried", False)

    def no_build():
        raise AssertionError("built although disabled")

    monkeypatch.setattr(native, "_build", no_build)
    assert native.load_native() is None


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    monkeypatch.delenv("LAYERSKIP_NATIVE", raising=False)
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_tried", False)

    def broken_build():
        raise RuntimeError("Error building extension: no compiler\nmore detail")

    monkeypatch.setattr(native, "_build", broken_build)
    with pytest.warns(RuntimeWarning, match="native CPU kernels unavailable.*no compiler") as caught:
        assert native.load_native() is None
        assert native.load_native() is None  # remembered: no second try, no second warning
    assert len(caught) == 1
