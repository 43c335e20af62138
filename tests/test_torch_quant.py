"""Weight-only int8/int4 through torch's kernels (model/kernels/torch_quant.py), checked on CPU through the CPU
variants of the ops: each product against F.linear of the weights it says it multiplies by, those weights against
a reference quantization written here, and a tiny model prepared end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import layerskip
from layerskip.loading import LoadedModel
from layerskip.model.kernels.linear import KernelError, fused_weight
from layerskip.model.kernels.torch_quant import TorchInt4Linear, TorchInt8Linear, prepare_torch_quantized

HAS_INT4_CPU = all(hasattr(torch.ops.aten, name)
                   for name in ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"))
needs_int4 = pytest.mark.skipif(not HAS_INT4_CPU, reason="this torch build has no CPU int4 ops "
                                "(_convert_weight_to_int4pack_for_cpu, _weight_int4pack_mm_for_cpu)")
FORMATS = ["int8", pytest.param("int4", marks=needs_int4)]
# A product's error against F.linear(x, dequantized()), relative to the largest output: float32 inputs differ only
# in the order of the sums; bfloat16 outputs are rounded once (int4) or twice (int8: the product, then its scaled
# value), each rounding within 2**-9 relative, so 2**-7 leaves a factor of 2. A wrong layout errs by ~100%.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7}


def make(weight_format: str, weight: torch.Tensor, bias: torch.Tensor | None, **options):
    cls = TorchInt8Linear if weight_format == "int8" else TorchInt4Linear
    return cls.from_float(weight, bias, **options)


def random_weight(rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    """Rows of different scales and offsets, so a row or group mixed up with another shows."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.rand(rows, 1, generator=generator) * 0.5 + 0.02
    offset = torch.randn(rows, 1, generator=generator) * 0.05
    return torch.randn(rows, columns, generator=generator) * scale + offset


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_format, options", [
    ("int8", {}), *(pytest.param("int4", {"group_size": size}, marks=needs_int4) for size in (32, 64, 128))])
def test_products_follow_the_dequantized_weights(weight_format, options, dtype):
    weight, bias = random_weight(40, 256), torch.randn(40)  # N = 40: int4 pads to 48 rows and slices them off
    prepared = make(weight_format, weight, bias, **options)
    weights = prepared.dequantized()
    assert weights.shape == (40, 256) and weights.dtype == torch.float32
    for rows in (1, 5, 16):
        x = torch.randn(2, rows, 256).to(dtype)
        out = prepared(x)
        assert out.shape == (2, rows, 40) and out.dtype == dtype
        expected = F.linear(x.float(), weights, bias)
        error = (out.float() - expected).abs().max().item()
        assert error <= TOLERANCE[dtype] * expected.abs().max().item(), (rows, error)


def test_int8_weights_are_symmetric_per_row_round_half_to_even():
    weight = random_weight(24, 96)
    weight[3] = 0.0  # an all-zero row stays zero (no 0/0)
    weight[5, 7] = 2.5 * weight[5].abs().max() / 127 / (1 + 1e-7)  # near a half step: rounds as torch.round does
    prepared = TorchInt8Linear.from_float(weight, None)
    scale = weight.abs().amax(dim=1, keepdim=True) / 127
    expected = torch.where(scale > 0, torch.round(weight / scale), 0.0) * scale
    assert torch.equal(prepared.dequantized(), expected)
    assert prepared.weight.dtype == torch.int8 and int(prepared.weight.abs().max()) == 127
    assert torch.all((prepared.dequantized() - weight).abs() <= scale / 2 * (1 + 1e-6))
    assert prepared.nbytes == 24 * 96 + 24 * 4


def reference_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group by group: step = (max - min) / 15 and zero = min + 8 steps, both in bfloat16; each weight the nearest
    (q - 8) * step + zero with q in [0, 15]. Returns the float32 weights, steps and zeros [N, groups]."""
    weights, steps, zeros = torch.empty_like(weight), [], []
    for start in range(0, weight.shape[1], group_size):
        group = weight[:, start:start + group_size]
        low, high = group.min(dim=1).values, group.max(dim=1).values
        step = torch.clamp((high - low) / 15, min=1e-6).bfloat16().float()
        zero = (low + 8 * step).bfloat16().float()
        levels = (torch.arange(16.0) - 8) * step[:, None] + zero[:, None]  # [N, 16]
        nearest = (group[:, :, None] - levels[:, None, :]).abs().argmin(dim=-1)
        weights[:, start:start + group_size] = levels.gather(1, nearest)
        steps.append(step)
        zeros.append(zero)
    return weights, torch.stack(steps, dim=1), torch.stack(zeros, dim=1)


@needs_int4
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_weights_are_the_reference_groupwise_quantization(group_size):
    weight = random_weight(32, 256, seed=1)
    prepared = TorchInt4Linear.from_float(weight, None, group_size)
    expected, steps, zeros = reference_int4(weight, group_size)
    # The layout torch's kernels read: [K / group_size, N, 2] bfloat16, [..., 0] the step and [..., 1] the zero.
    assert prepared.scales_and_zeros.shape == (256 // group_size, 32, 2)
    assert prepared.scales_and_zeros.dtype == torch.bfloat16
    assert torch.equal(prepared.scales_and_zeros[..., 0].t().float(), steps)
    assert torch.equal(prepared.scales_and_zeros[..., 1].t().float(), zeros)
    # The kernel's own weights (read back through it) against the reference, within float32 rounding of
    # (q - 8) * step + zero; a nearest level ties only at exact midpoints, which random weights do not hit.
    dequantized = prepared.dequantized()
    torch.testing.assert_close(dequantized, expected, rtol=0, atol=1e-6)
    half_step = steps.repeat_interleave(group_size, dim=1) / 2
    assert torch.all((dequantized - weight).abs() <= half_step * (1 + 1e-3) + 1e-6)
    assert prepared.nbytes == 32 * 256 // 2 + (256 // group_size) * 32 * 2 * 2


@pytest.mark.parametrize("weight_format", FORMATS)
def test_rows_are_the_same_quantization_of_those_rows(weight_format):
    """What the draft head slices out of the LM head: any number of rows, in any order."""
    weight, bias = random_weight(64, 128, seed=2), torch.randn(64)
    prepared = make(weight_format, weight, bias)
    ids = torch.tensor([5, 0, 63, 17, 9, 33, 2])
    sliced = prepared.rows(ids, weight[ids])
    assert torch.equal(sliced.dequantized(), prepared.dequantized()[ids])
    x = torch.randn(3, 128)
    torch.testing.assert_close(sliced(x), prepared(x)[:, ids], rtol=1e-5, atol=1e-5)


@needs_int4
def test_int4_refuses_shapes_its_kernels_cannot_take():
    with pytest.raises(KernelError, match="multiple of 32, not 48"):
        TorchInt4Linear.from_float(torch.randn(16, 48), None)
    with pytest.raises(KernelError, match="multiple of 128, not 192"):
        TorchInt4Linear.from_float(torch.randn(16, 192), None, group_size=128)
    with pytest.raises(KernelError, match="groups of 16 weights"):
        TorchInt4Linear.from_float(torch.randn(16, 64), None, group_size=16)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from conftest import make_hf_model

    folder = tmp_path_factory.mktemp("tiny_torch_quant")
    # vocab 97: the int4 head pads its rows to 112; no EOS, so greedy decoding runs its full length
    make_hf_model(num_hidden_layers=2, hidden_size=64, intermediate_size=128, eos_token_id=None).save_pretrained(folder)
    return folder


def load_with_weights(folder, prepared_from) -> LoadedModel:
    """The float model whose linears hold the weights that `prepared_from`'s prepared linears multiply by."""
    loaded = layerskip.load(str(folder), cpu_kernels="plain")
    with torch.no_grad():
        for module, quantized in zip(loaded.model.prepared_modules(), prepared_from.prepared_modules()):
            for group, linears in module.linear_groups().items():
                rows = quantized.prepared[group].dequantized().split([linear.out_features for linear in linears])
                for linear, weight in zip(linears, rows):
                    linear.weight.copy_(weight)
    return loaded


@pytest.mark.parametrize("weight_format", FORMATS)
def test_a_prepared_model_decodes_through_its_quantized_weights(tiny_folder, weight_format):
    from conftest import assert_same_greedy_tokens

    loaded = layerskip.load(str(tiny_folder), cpu_kernels="plain")
    float_model = layerskip.load(str(tiny_folder), cpu_kernels="plain").model
    prepare_torch_quantized(loaded.model, weight_format)
    model = loaded.model
    assert (model.kernel_path, model.weight_format) == ("torch", weight_format)
    cls = TorchInt8Linear if weight_format == "int8" else TorchInt4Linear
    for module in model.prepared_modules():
        assert set(module.prepared) == set(module.linear_groups())
        assert all(isinstance(prepared, cls) for prepared in module.prepared.values())
        for group, linears in module.linear_groups().items():  # close to the float weights
            weight, _ = fused_weight(linears)
            error = (module.prepared[group].dequantized() - weight).abs().max().item()
            assert error <= weight.abs().max().item() / (100 if weight_format == "int8" else 10), group

    tokens = torch.tensor([[1, 2, 3, 4]])
    same_weights = load_with_weights(tiny_folder, model)
    with torch.inference_mode():
        logits = model(tokens)
        reference = same_weights.model(tokens)
        original = float_model(tokens)
    # Through the prepared linears: the float model with the dequantized weights, up to the order of the sums.
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
    # And near the unquantized model, loosely (relative norms; measured 0.02 int8, 0.22 int4 on these random
    # weights, which every layer's quantization error compounds through; unrelated logits would be ~1.4).
    loose = 0.1 if weight_format == "int8" else 0.5
    assert (logits - original).norm() <= loose * original.norm()

    result = layerskip.generate(loaded, prompt_ids=[1, 2, 3], max_steps=8, sample=False,
                                generation_strategy="autoregressive")
    assert len(result.token_ids) == 8 and result.finish_reason == "max_steps"
    expected = layerskip.generate(same_weights, prompt_ids=[1, 2, 3], max_steps=8, sample=False,
                                  generation_strategy="autoregressive")
    assert_same_greedy_tokens(same_weights, [1, 2, 3], expected.token_ids, result.token_ids, row_invariant=False)


def test_an_unknown_format_is_a_kernel_error(tiny_folder):
    loaded = layerskip.load(str(tiny_folder), cpu_kernels="plain")
    with pytest.raises(KernelError, match="int8 or int4, not q4_0"):
        prepare_torch_quantized(loaded.model, "q4_0")
