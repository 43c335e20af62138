"""Shared fixtures: tiny random checkpoints written with transformers, and the embedded default model."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

warnings.filterwarnings("ignore", category=UserWarning)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_CONFIG: dict[str, Any] = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)


def make_hf_model(**overrides: Any) -> Any:
    """A random transformers LlamaForCausalLM; weights scaled up so logits are far from uniform."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(overrides.pop("seed", 0))
    config = LlamaConfig(**{**TINY_CONFIG, **overrides})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
            else:
                parameter.normal_(0.0, 0.15)
    return model


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Callable[..., tuple[Path, Any]]:
    """Factory: write a tiny HF checkpoint folder (no tokenizer); returns (folder, hf_model)."""

    def write(name: str = "tiny", **overrides: Any) -> tuple[Path, Any]:
        model = make_hf_model(**overrides)
        folder = tmp_path / name
        model.save_pretrained(folder)
        return folder, model

    return write


@pytest.fixture(scope="session")
def default_model() -> Any:
    import layerskip

    return layerskip.load()


# Greedy decodings compared across strategies, batch shapes or engines. Through row-invariant kernels (ours) a
# position's logits do not depend on how many rows share its pass, so the tokens must be identical. Through
# library kernels (MKL, oneDNN, HF transformers) a row's result moves by ~1e-6 relative with the rows beside it,
# which 30 layers grow to ~1e-4 on logits of scale ~30: there, and only there, two decodings may part at a
# position where the reference's two best logits are within NEAR_TIE, and both continuations are correct.
NEAR_TIE = 2e-3


def assert_same_greedy_tokens(loaded: Any, prompt_ids: list[int], expected: list[int], actual: list[int],
                              *, exit_layer: int | None = None, row_invariant: bool | None = None) -> None:
    """`actual` equals `expected` (greedy tokens after `prompt_ids`), or parts from it only at a near-tie of a
    library kernel; `row_invariant` defaults to whether the model decodes through our row-invariant kernels."""
    if actual == expected:
        return
    same = next(i for i, (a, b) in enumerate(zip(actual + [None], expected + [None])) if a != b)
    if row_invariant is None:
        row_invariant = getattr(loaded.model, "row_invariant", False)
    assert not row_invariant, f"row-invariant kernels, yet the tokens part at {same}: {actual} != {expected}"
    assert same < min(len(actual), len(expected)), f"one decoding stops early at {same}: {actual} != {expected}"
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([prompt_ids + expected[:same]]), exit_layer=exit_layer)[0, -1]
    best, second = logits.topk(2).values.tolist()
    assert {actual[same], expected[same]} <= set(logits.topk(2).indices.tolist()) and best - second < NEAR_TIE, \
        f"tokens part at {same} without a near-tie (top-2 margin {best - second:.2e}): {actual} != {expected}"


def llama_cpp_row_order(weight: np.ndarray, heads: int) -> np.ndarray:
    """The q/k row permutation that llama.cpp's converter applies (the forward direction)."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def gguf_metadata(hf: Any) -> dict[str, Any]:
    """The llama GGUF metadata of a tiny HF model."""
    config = hf.config
    return {"llama.block_count": config.num_hidden_layers, "llama.context_length": config.max_position_embeddings,
            "llama.embedding_length": config.hidden_size, "llama.feed_forward_length": config.intermediate_size,
            "llama.attention.head_count": config.num_attention_heads,
            "llama.attention.head_count_kv": config.num_key_value_heads,
            "llama.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps), "llama.rope.freq_base": 10000.0,
            "llama.vocab_size": config.vocab_size}


def write_tiny_gguf(path: Path, hf: Any, metadata: dict[str, Any] | None = None) -> None:
    """A llama GGUF holding a tiny HF model's weights (norms F32, matrices F16 in llama.cpp's q/k row order,
    token embeddings Q8_0), with the given metadata (default: the model's own, `gguf_metadata`)."""
    import gguf
    from gguf.quants import quantize

    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (gguf_metadata(hf) if metadata is None else metadata).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_int32(key, value)
    writer.add_eos_token_id(3)
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    heads = {"q_proj": hf.config.num_attention_heads, "k_proj": hf.config.num_key_value_heads}
    for name, tensor in hf.state_dict().items():
        stem = name.removeprefix("model.").removesuffix(".weight")
        if stem.startswith("layers."):
            _, index, module = stem.split(".", 2)
            gguf_name = f"blk.{index}.{names[module]}.weight"
        else:
            gguf_name = f"{names[stem]}.weight"
        array = tensor.detach().float().numpy()
        if stem.rpartition(".")[2] in heads:
            array = llama_cpp_row_order(array, heads[stem.rpartition(".")[2]])
        if stem == "embed_tokens":
            writer.add_tensor(gguf_name, quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif array.ndim == 2:
            writer.add_tensor(gguf_name, array.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
