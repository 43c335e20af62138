"""Shared fixtures: tiny random checkpoints written with transformers, and the embedded default model."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable

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
