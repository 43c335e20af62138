"""Quantized weights at load (`quantize=`): the gguf package's blocks, GGUF files' own blocks kept as they are,
decoding against the dequantized weights, greedy self-speculation identical in every format, one-line errors."""

from __future__ import annotations

import pytest
import torch

import layerskip
from layerskip.errors import LayerSkipError
from layerskip.model.kernels import native
from layerskip.model.kernels.linear import dequantize_blocks, fused_weight, quantize_blocks
from layerskip.model.kernels.prepare import QUANTIZE

pytestmark = pytest.mark.skipif(native.load_native() is None, reason="the native kernels do not build here")
FORMATS = ["bf16", "int8", "int4"]
PROMPTS = [[3, 14, 15, 92, 65], [2, 71, 82, 81, 82, 84, 59, 4, 52], [9]]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from conftest import make_hf_model

    folder = tmp_path_factory.mktemp("tiny")
    make_hf_model(num_hidden_layers=4, tie_word_embeddings=True).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("quantize", FORMATS)
def test_quantized_weights_are_the_gguf_packages_blocks(tiny_folder, quantize):
    loaded = layerskip.load(str(tiny_folder), quantize=quantize)
    model, weight_format = loaded.model, QUANTIZE[quantize]
    assert model.weight_format == weight_format and model.kernel_path == "native"
    for module in model.prepared_modules():
        for group, linears in module.linear_groups().items():
            prepared = module.prepared[group]
            weight, _ = fused_weight(linears)
            expected = weight.to(torch.bfloat16).float() if quantize == "bf16" else \
                dequantize_blocks(quantize_blocks(weight, weight_format), weight_format)
            assert torch.equal(prepared.dequantized(), expected), group


def round_activations_to_8_bits(x: torch.Tensor) -> torch.Tensor:
    """What the Q8_0/Q4_x kernels multiply by: each row in blocks of 32, scale max|x| / 127, round half to even."""
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    quantized = torch.where(scale > 0, torch.round(blocks / scale), 0.0)
    return (quantized * scale).reshape(x.shape)


@pytest.mark.parametrize("quantize", FORMATS)
def test_every_quantized_product_follows_the_dequantized_weights(tiny_folder, quantize):
    """Each prepared matrix of the model, on the activations it really sees, against F.linear of its dequantized
    weights. The block formats' kernels multiply activation rows rounded to 8 bits per 32 values (as llama.cpp
    does), and bfloat16's rounded to bfloat16, so the reference rounds its input the same way; what is left is
    the order of the sums. (End to end such a rounding can flip at a boundary, so logits are compared product
    by product.)"""
    quantized = layerskip.load(str(tiny_folder), quantize=quantize).model
    reference = layerskip.load(str(tiny_folder), cpu_kernels="plain").model
    inputs = {}

    def keep_input(key, args) -> None:
        inputs.setdefault(key, args[0])

    for module in reference.prepared_modules():
        for group, linears in module.linear_groups().items():
            linears[0].register_forward_pre_hook(lambda _, args, key=(module, group): keep_input(key, args))
    with torch.inference_mode():
        reference(torch.tensor([PROMPTS[1]]))
        for (module, group), x in inputs.items():
            prepared = quantized.prepared_modules()[reference.prepared_modules().index(module)].prepared[group]
            _, bias = fused_weight(module.linear_groups()[group])
            rounded = x.bfloat16().float() if quantize == "bf16" else round_activations_to_8_bits(x)
            expected = torch.nn.functional.linear(rounded, prepared.dequantized(), bias)
            assert (prepared(x) - expected).abs().max() <= 1e-5 * expected.abs().max(), group
    assert len(inputs) == 4 * len(reference.layers) + 1  # qkv, o, gate_up, down per layer; the head


@pytest.mark.parametrize("quantize", FORMATS)
def test_greedy_self_speculation_is_identical_in_every_format(tiny_folder, quantize):
    """Row-invariant kernels in every format: exactly equal tokens, however many rows a pass holds."""
    loaded = layerskip.load(str(tiny_folder), quantize=quantize)
    assert loaded.model.row_invariant
    for prompt in PROMPTS:
        reference = layerskip.generate(loaded, prompt_ids=prompt, max_steps=24, sample=False,
                                       generation_strategy="autoregressive")
        for exit_layer, k in ((1, 3), (3, 5)):
            result = layerskip.generate(loaded, prompt_ids=prompt, max_steps=24, sample=False, exit_layer=exit_layer,
                                        generation_strategy="self_speculative", num_speculations=k)
            assert result.token_ids == reference.token_ids


def test_embedded_gguf_runs_from_its_own_blocks(default_model):
    """int4 on the Q4_1 file: the layers run from the file's Q4_1 blocks and the tied head from its Q8_0
    embedding blocks, unrequantized: their dequantized values are exactly the float32 weights converted from
    the same file by the gguf package."""
    loaded = layerskip.load(quantize="int4")
    model = loaded.model
    attention = model.layers[3].self_attn.prepared["qkv"]
    assert attention.weight_format == "q4_1" and model.prepared["head"].weight_format == "q8_0"
    reference = default_model.model
    expected = torch.cat([reference.layers[3].self_attn.q_proj.weight, reference.layers[3].self_attn.k_proj.weight,
                          reference.layers[3].self_attn.v_proj.weight])
    assert torch.equal(attention.dequantized(), expected)
    assert torch.equal(model.layers[7].mlp.prepared["down"].dequantized(), reference.layers[7].mlp.down_proj.weight)
    assert torch.equal(model.prepared["head"].dequantized(), reference.lm_head.weight)
    assert sum(p.nbytes for m in model.prepared_modules() for p in m.prepared.values()) < 0.2 * 4 * sum(
        linear.weight.numel() for m in reference.prepared_modules() for g in m.linear_groups().values()
        for linear in g)  # Q4_1 layers and a Q8_0 head: under a fifth of float32's bytes
    ids = default_model.tokenizer.encode_chat([{"role": "user", "content": "Name a primary colour."}])
    reference_ids = layerskip.generate(loaded, prompt_ids=ids, max_steps=16, sample=False,
                                       generation_strategy="autoregressive").token_ids
    speculative = layerskip.generate(loaded, prompt_ids=ids, max_steps=16, sample=False, exit_layer=12,
                                     generation_strategy="self_speculative", num_speculations=4)
    assert speculative.token_ids == reference_ids


def test_unsupported_combinations_are_one_line_errors(tiny_folder, tmp_path):
    with pytest.raises(LayerSkipError, match="unknown quantize 'int3': choose one of none, bf16, int8, int4"):
        layerskip.load(str(tiny_folder), quantize="int3")
    with pytest.raises(LayerSkipError, match="q8_0 weights need the native CPU kernels, which the plain CPU"):
        layerskip.load(str(tiny_folder), quantize="int8", cpu_kernels="plain")
    from conftest import make_hf_model

    odd = tmp_path / "odd"
    make_hf_model(hidden_size=48, num_attention_heads=4, num_key_value_heads=2).save_pretrained(odd)
    with pytest.raises(LayerSkipError, match="q4_1 weights need an input size that is a multiple of 32, not 48"):
        layerskip.load(str(odd), quantize="int4")
